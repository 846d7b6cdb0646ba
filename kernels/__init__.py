"""Triton device code for peftops, one file per method. Installed as ``peftops.kernels``.

Only ``@triton.jit`` kernels and their launch configurations live here; autograd, argument
checks and dispatch are host code in ``peftops.ops``.
"""
