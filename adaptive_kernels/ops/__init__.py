"""Kernel families, one per module, each with a PyTorch reference of the same semantics."""
