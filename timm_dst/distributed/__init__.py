"""FSDP2 (``fully_shard``) support: DTensor helpers, sharded masks, the sharded gradient capture.

Layer 0: imports nothing else of timm_dst, and nothing of ``torch.distributed.tensor`` at import time.
"""
