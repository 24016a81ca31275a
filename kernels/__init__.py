"""Compute kernels: each Triton kernel sits beside a plain-torch reference of the same function."""
