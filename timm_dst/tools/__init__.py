"""Tools over the library: the architecture zoo check and the sweep runner. Layer 4 (front ends)."""
