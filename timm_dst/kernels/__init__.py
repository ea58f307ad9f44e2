"""Sparse linear kernels (CSR and block-sparse forward). Layer 0: imports nothing else of timm_dst."""
