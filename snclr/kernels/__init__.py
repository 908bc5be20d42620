"""Triton kernels and their launchers (no autograd, no SNCLR knowledge).

Importing this package needs no GPU; kernels compile on first launch.
"""
