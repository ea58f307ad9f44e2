"""The engine: the controller, masks and their reparametrisation, targets, distributions, schedules, structure.

Layer 1: imports only :mod:`timm_dst.kernels` and :mod:`timm_dst.distributed` below it (docs/design.md, "Layers").
"""
