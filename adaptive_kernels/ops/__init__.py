"""Kernel families, one per module, each with a PyTorch reference of the same semantics.

Index arguments (``rows``, ``cols``, ``q_to_kv``) are checked for shape and dtype, not for their values,
which would wait for the device: a negative entry is padding, and any other must be less than the number
of rows, columns or heads it indexes; one past them reads memory outside them.
"""
