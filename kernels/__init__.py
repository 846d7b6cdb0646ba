"""Triton device code for peftops, one file per method. Installed as ``peftops.kernels``.

Only ``@triton.jit`` kernels and their launch configurations live here; autograd, argument
checks and dispatch are host code in ``peftops.ops``.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host-side launch configs. ``triton.cdiv`` / ``next_power_of_2``
    are constexpr functions there: each Python call costs microseconds (7 calls were half of
    a decode call's host time), which a decode step pays on every layer."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), host side (see ``cdiv``)."""
    return 1 << max(0, int(n) - 1).bit_length()

