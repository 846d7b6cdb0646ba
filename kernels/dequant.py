"""The 4-bit dequantiser, shared by every op over a 4-bit base (QLoRA, QDoRA): bitsandbytes'
storage read as it is.

Storage (bitsandbytes 0.50 ``quantize_4bit``, checked against its source and by the tests):
* ``packed`` uint8 ``[ceil(n / 2)]`` over the weight flattened row-major (``[out, in]``):
  element ``2i`` is the HIGH nibble of byte ``i``, element ``2i + 1`` the low nibble;
* ``absmax`` fp32 ``[ceil(n / blocksize)]``: element ``e`` belongs to block ``e // blocksize``
  (blocks run over the flat weight; the last may be short), blocksize 32 ... 4096;
* ``code`` fp32 ``[16]``: the nf4 / fp4 value of each nibble;
* double quantisation (``compress_statistics``): absmax itself is stored as uint8 indices
  ``qabs`` into a 256-entry ``code2`` (bitsandbytes' dynamic map), per nested block of
  ``NESTED_BLOCKSIZE`` (256) with fp32 ``absmax2``, minus the fp32 ``offset`` (its mean):
  ``absmax[b] = fp32(code2[qabs[b]] * absmax2[b // 256]) + offset``.

Value: ``W[e] = round_to_out(fp32(code[q_e]) * fp32(absmax[e // blocksize]))``: one fp32
product, rounded once to the output dtype. The nested absmax has two separate roundings
(bitsandbytes dequantises it into an fp32 tensor, then adds the offset), so the launchers
compile these kernels with ``enable_fp_fusion=False`` (no mul-add contracted into an FMA).

``dequant_4bit_kernel`` writes W in the compute dtype (bf16 / fp16 / fp32) directly, no fp32
copy. ``dequant_tile`` is the same arithmetic for a ``[BLOCK_N, BLOCK_K]`` tile of W's rows
inside another kernel's main loop (the fused 4-bit GEMV in kernels/qlora.py).
"""
import triton
import triton.language as tl

from . import enumerates, variant

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these


@triton.jit
def block_absmax(blk, mask, absmax_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the quant blocks ``blk`` (any shape; masked lanes give 0)."""
    if NESTED:
        q = tl.load(qabs_ptr + blk, mask=mask, other=0).to(tl.int32)
        c = tl.load(code2_ptr + q)
        a2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.where(mask, c * a2 + tl.load(offset_ptr), 0.0)   # two roundings: launched without FMA fusion
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def unpack_nibbles(b):
    """uint8 bytes ``[..., B]`` -> int32 codes ``[..., 2B]``: high nibble first."""
    return tl.interleave((b >> 4).to(tl.int32), (b & 15).to(tl.int32))


@triton.jit
def round_to(w, ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``w`` rounded to ``ty`` to nearest-even (as bitsandbytes' kernels and torch round).
    ``SOFT_BF16``: by integer arithmetic, for Triton's CPU interpreter, whose fp32 -> bf16
    cast truncates (finite values; GPUs take the native cast)."""
    if SOFT_BF16 and ty == tl.bfloat16:
        b = w.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(ty)


@triton.jit
def dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                        numel, n_bytes,
                        NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        SOFT_BF16: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[e] = code[q_e] * absmax[e // BLOCKSIZE] for the 2 * BLOCK_B elements of BLOCK_B bytes."""
    BLOCK_E: tl.constexpr = 2 * BLOCK_B
    QB: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_E else BLOCK_E   # elements per row of the tile
    NB: tl.constexpr = BLOCK_E // QB                                    # quant blocks in the tile
    pid = tl.program_id(0).to(tl.int64)
    bo = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b = tl.load(packed_ptr + bo, mask=bo < n_bytes, other=0)
    v = tl.load(code_ptr + unpack_nibbles(b)).reshape(NB, QB)
    e0 = pid * BLOCK_E
    first = e0 + tl.arange(0, NB).to(tl.int64) * QB                     # each row of the tile: one quant block
    a = block_absmax(first // BLOCKSIZE, first < numel, absmax_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                     NESTED, NESTED_BLOCKSIZE)
    w = (v * a[:, None]).reshape(BLOCK_E)
    e = e0 + tl.arange(0, BLOCK_E)
    tl.store(out_ptr + e, round_to(w, out_ptr.dtype.element_ty, SOFT_BF16), mask=e < numel)


@triton.jit
def dequant_tile(packed_ptr, absmax_ptr, code_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                 rn, k0, N, K, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile ``W[rn, k0:k0 + BLOCK_K]`` of a ``[N, K]`` weight with even K and
    ``K % BLOCKSIZE == 0`` (a row starts on a byte and on a quant block); out-of-range
    elements are 0."""
    QB: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K
    NB: tl.constexpr = BLOCK_K // QB
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    row = rn.to(tl.int64)
    b = tl.load(packed_ptr + row[:, None] * (K // 2) + kb[None, :], mask=(rn[:, None] < N) & (kb[None, :] < K // 2),
                other=0)
    v = tl.load(code_ptr + unpack_nibbles(b)).reshape(BLOCK_N, NB, QB)
    kf = k0 + tl.arange(0, NB) * QB
    blk = row[:, None] * (K // BLOCKSIZE) + (kf // BLOCKSIZE)[None, :]
    a = block_absmax(blk, (rn[:, None] < N) & (kf[None, :] < K), absmax_ptr, qabs_ptr, code2_ptr, absmax2_ptr,
                     offset_ptr, NESTED, NESTED_BLOCKSIZE)
    return (v * a[:, :, None]).reshape(BLOCK_N, BLOCK_K)


def dequant_config(n_bytes: int, interpret: bool) -> dict:
    """BLOCK_B bytes per program (2 * BLOCK_B elements); the interpreter takes few large programs."""
    if interpret:
        return dict(BLOCK_B=4096, num_warps=4)
    return dict(BLOCK_B=1024, num_warps=4)


@enumerates(dequant_config)
def dequant_config_variants():
    """Every config dequant_config returns (one: it does not depend on the size), for compile-check."""
    yield variant("dequant_4bit_kernel", dequant_config(1 << 24, False))
