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


# ------------------------------------------------ the configs a launch-config function can return
# Every ``*config`` function here declares, next to itself, a generator of every config it can
# return (``@enumerates(config_fn)``), so ``python -m peftops compile-check`` compiles each one
# for the GPU, not only those the test suite happens to reach (tests/test_config_variants.py
# fails on a config function without one).

# Sizes to evaluate a config function at: every power of two and the next integer, 1 .. 2^17,
# so each threshold of the form ``n <= 2^k`` / ``n < 2^k`` / ``n >= 2^k + 1`` is met on both sides.
SIZES = tuple(sorted({1 << i for i in range(18)} | {(1 << i) + 1 for i in range(18)}))
HALF = ("bfloat16", "float16")
FP32 = ("float32",)


def enumerates(config_fn):
    """Declares the decorated generator as the enumeration of ``config_fn``'s configs."""
    def mark(gen):
        config_fn.variants = gen
        return gen
    return mark


def variant(kernel, cfg, *, dtypes=None, where=None, descs=None, **constexprs):
    """One config a launch-config function returns, as compile-check applies it to the launches
    recorded for ``kernel``: ``cfg``'s upper-case keys (BLOCK_*, GROUP_M, ONE_PASS) and
    ``constexprs`` (those the launcher derives from the same shapes: BLOCK_W, BLOCK_D)
    replace the recorded constexprs, its num_warps / num_stages the launch options (its other
    keys are run-time integers: splits, rows per split). It applies to recorded launches whose
    first tensor has one of ``dtypes`` (None: any) and whose constexprs equal ``where`` (the
    flags the function was called with, and flags that also change the arguments, such as
    SPLIT_K's partial buffers: those are matched, never set). ``descs(constexprs)`` gives the
    TMA descriptors' block shapes by parameter name for kernels that take descriptors."""
    cx = {k: v for k, v in cfg.items() if k.isupper()}
    cx.update(constexprs)
    return {"kernel": kernel, "constexprs": cx,
            "options": {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg},
            "dtypes": tuple(dtypes) if dtypes else None, "where": dict(where or {}), "descs": descs}
