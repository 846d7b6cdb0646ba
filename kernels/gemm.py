"""Shared Hopper-class GEMM machinery: a persistent, grouped tile schedule and a TMA main
loop, written once and extended with epilogues by the ops that sit on a frozen GEMM (the
LoRA forward and dx, gated LoRA; IA3 can take the same main loop).

* ``tile_of`` / ``block_of``: a persistent program walks tiles ``pid, pid + P, pid + 2P, ...``
  (P = the number of programs = SMs); tile ids are mapped in grouped order so GROUP_M row
  blocks share each column block of W while it sits in L2 (the non-persistent GEMMs of
  kernels/lora.py and kernels/ia3.py map their program ids the same way).
* ``tma_mainloop``: ``acc = X[rows] @ W[:, cols]`` with X and W read by TMA tensor
  descriptors (no address arithmetic or masks in the loop; edges are zero-filled by the
  copy engine), software-pipelined over K by ``num_stages``; on sm_90 the dot lowers to
  wgmma with both operands in shared memory. W is stored either ``[N, K]`` (a frozen
  ``nn.Linear`` weight read as W^T, ``W_NK``) or ``[K, N]``. Optionally the same loop also
  accumulates ``S = X @ A^T`` for a rank-r ``A [r, K]`` from the X tiles it already holds
  (``FUSE_S``): a [BLOCK_M, BLOCK_R] fp32 accumulator, BLOCK_R / BLOCK_N more MMA work.

Host side: descriptors are built per call from the tensors (``peftops/ops/lora.py``); a
tensor qualifies when its last stride is 1, its other strides and base are 16-byte aligned.
"""
import triton
import triton.language as tl


@triton.jit
def block_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of tile number ``tile`` in grouped order: GROUP_M row blocks
    share each column block of W while it sits in L2 (every GEMM here, persistent or not)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_size, (tile % in_group) // group_size


@triton.jit
def tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row offset, column offset) of tile number ``tile`` in grouped order."""
    pid_m, pid_n = block_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def tma_mainloop(x_desc, w_desc, a_desc, off_m, off_n, K,
                 W_NK: tl.constexpr, FUSE_S: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """(acc, s): acc = X[off_m:, :] @ W[:, off_n:] and, with FUSE_S, s = X[off_m:, :] @ A^T,
    both fp32 [BLOCK_M, BLOCK_N] / [BLOCK_M, BLOCK_R] (s is zeros without FUSE_S)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        xt = x_desc.load([off_m, k0])
        if W_NK:
            wt = w_desc.load([off_n, k0]).T
        else:
            wt = w_desc.load([k0, off_n])
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if FUSE_S:
            at = a_desc.load([0, k0])
            s = tl.dot(xt, at.T.to(xt.dtype), s, input_precision=PRECISION)
    return acc, s
