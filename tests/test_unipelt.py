"""UniPELT: the gated LoRA op (kernels under the Triton interpreter) vs the float64 reference,
the gated adapter / prefix modules, and a whole attention + FFN block with the three gated
submodules vs a float64 plain-PyTorch composition written out here."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftops
from peftops import reference
from peftops.nn.unipelt import (GatedBottleneckAdapter, GatedLoraLinear, GatedPrefix, UniPELTConfig,
                                UniPELTLayer)
from peftops.ops import unipelt as unipelt_ops
from peftops.ops.unipelt import gated_lora_linear
from parity import (BOUNDS, DEVICE, DTYPES, assert_close, check_parity, forced_path, large_case, randn, rel_err,
                    table_paths)

pytestmark = pytest.mark.usefixtures("seed_per_test")


# ------------------------------------------------------------------ gated LoRA op
def gl_args(lead, n_in, n_out, r):
    return dict(x=randn(*lead, n_in), weight=randn(n_out, n_in, scale=n_in ** -0.5), bias=randn(n_out),
                lora_A=randn(r, n_in, scale=n_in ** -0.5), lora_B=randn(n_out, r, scale=r ** -0.5),
                gate_weight=randn(1, n_in, scale=n_in ** -0.5), gate_bias=randn(1))


def gl_parity(args, dtype, mode, grads=("x", "lora_A", "lora_B", "gate_weight", "gate_bias"), scaling=1.0):
    return check_parity(lambda **a: gated_lora_linear(**a, gate_mode=mode, scaling=scaling)[0],
                        lambda **a: reference.gated_lora_linear(**a, gate_mode=mode, scaling=scaling)[0],
                        args, list(grads), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("lead,n_in,n_out,r", [((2, 13), 37, 29, 8), ((2, 3, 5), 24, 40, 7), ((1,), 16, 16, 1)])
def test_gated_lora_parity(lead, n_in, n_out, r, mode, dtype):
    gl_parity(gl_args(lead, n_in, n_out, r), dtype, mode)


def test_gated_lora_trainable_base_and_scaling():
    gl_parity(gl_args((2, 9), 30, 27, 4), torch.float32, "sequence",
              grads=("x", "weight", "bias", "lora_A", "lora_B", "gate_weight", "gate_bias"), scaling=0.5)


def test_gated_lora_gate_values_and_2d_input():
    """2-D x is one sample: the sequence gate is the mean over all rows."""
    a = {n: t.float() for n, t in gl_args((11,), 20, 18, 8).items()}
    y, g = gated_lora_linear(**a)
    assert g.shape == (1, 1) and not g.requires_grad
    expect = torch.sigmoid(a["x"] @ a["gate_weight"].t() + a["gate_bias"]).mean()
    assert_close("gate", g, expect.view(1, 1), 1e-6)
    y_tok, g_tok = gated_lora_linear(**a, gate_mode="token")
    assert g_tok.shape == (11, 1)


def test_gated_lora_zero_rows():
    a = {n: t.float().requires_grad_() for n, t in gl_args((2, 0), 16, 12, 8).items()}
    y, g = gated_lora_linear(**a)
    assert y.shape == (2, 0, 12)
    y.sum().backward()
    assert a["lora_A"].grad.abs().sum() == 0 and a["gate_weight"].grad.abs().sum() == 0


def test_gated_lora_kernels_ran():
    """The kernel path's launches (forced: on CUDA the table picks cublas; both paths run in
    tests/test_paths_lora.py)."""
    peftops.reset_dispatch_counts()
    with peftops.force_path("gated_lora", "kernel"):
        gl_parity(gl_args((2, 5), 16, 16, 8), torch.float32, "sequence")
    c = peftops.dispatch_counts()
    assert c.get("gated_lora.triton") == 1 and not c.get("gated_lora.reference")
    # forward: 1 skinny ([S | z] in one pass) + 1 GEMM; backward: 2 skinny + 1 GEMM
    assert c.get("launch.lora_skinny") == 3 and c.get("launch.lora_gemm") == 2, c


def test_gated_lora_float64_falls_back_visibly():
    peftops.reset_dispatch_counts()
    a = gl_args((2, 5), 16, 16, 8)
    y, _ = gated_lora_linear(**a)
    assert_close("y", y, reference.gated_lora_linear(**a)[0], 1e-12)
    assert peftops.dispatch_counts().get("gated_lora.fallback:float64") == 1


@pytest.mark.parametrize("over,exc,match", [
    (dict(gate_weight=torch.randn(2, 16, device=DEVICE)), ValueError, "gate_weight has shape"),
    (dict(gate_bias=torch.randn(2, device=DEVICE)), ValueError, "gate_bias has shape"),
    (dict(lora_B=torch.randn(16, 3, device=DEVICE)), ValueError, "lora_B has shape"),
    (dict(x=torch.randn(2, 5, 15, device=DEVICE)), ValueError, "x has 15 features"),
    (dict(gate_weight=torch.randn(1, 16, dtype=torch.float16, device=DEVICE)), TypeError, "gate_weight has dtype"),
    (dict(gate_mode="layer"), ValueError, "gate_mode"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
])
def test_gated_lora_bad_input(over, exc, match):
    a = {n: t.float() for n, t in gl_args((2, 5), 16, 16, 8).items()}
    a.update(over)
    with pytest.raises(exc, match=match):
        gated_lora_linear(**a)


@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", table_paths(unipelt_ops))
def test_gated_lora_gpu_sized(path, dtype, mode):
    """T = 4096 rows (2 x 2048), d = 1024, r = 16, each path: output and every gradient (x, A, B,
    the gate's weight and bias); fp32 under tf32 at TF32_BOUND, bf16 within 1.5x eager bf16's error."""
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    args = gl_args((2, 2048), 1024, 1024, 16)
    with forced_path("gated_lora", path):
        check_parity(lambda **a: gated_lora_linear(**a, gate_mode=mode)[0],
                     lambda **a: reference.gated_lora_linear(**a, gate_mode=mode)[0],
                     args, ["x", "lora_A", "lora_B", "gate_weight", "gate_bias"], dtype, **large_case(dtype))


# ------------------------------------------------------------------ gated modules
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_gated_adapter_module(mode):
    """GatedBottleneckAdapter (SeqBn) == LN(r + g_A f(LN(r))), r = h + x_in, g_A from LN(r)."""
    d = 48
    ad = GatedBottleneckAdapter(d, gate_mode=mode, device=DEVICE).double()
    ln = nn.LayerNorm(d, device=DEVICE).double()
    with torch.no_grad():
        ad.adapter_up.weight.normal_()
        ad.gate.weight.normal_()
        ln.weight.uniform_(0.5, 1.5)
    h, x_in = randn(2, 13, d), randn(2, 13, d)
    params = [h, x_in] + [p for p in ad.parameters()]
    for t in params:
        t.requires_grad_()
    ref_grads, ref_out = None, None
    for use_module in (False, True):
        for t in params:
            t.grad = None
        if use_module:
            ad32, ln32 = GatedBottleneckAdapter(d, gate_mode=mode, device=DEVICE), nn.LayerNorm(d, device=DEVICE)
            ad32.load_state_dict(ad.state_dict())
            ln32.load_state_dict(ln.state_dict())
            h32, x32 = h.detach().float().requires_grad_(), x_in.detach().float().requires_grad_()
            out = ad32(h32, x32, ln32)
            out.backward(dy.float())
            got = [h32.grad, x32.grad] + [p.grad for p in ad32.parameters()]
            assert_close("out", out, ref_out, 1e-5)
            for i, (g, e) in enumerate(zip(got, ref_grads)):
                assert_close(f"grad {i}", g, e, 1e-5)
            assert ad32.last_gate.shape == ((2, 1, 1) if mode == "sequence" else (2, 13, 1))
        else:
            r = h + x_in
            z = F.layer_norm(r, (d,), ln.weight, ln.bias, ln.eps)
            g = torch.sigmoid(z @ ad.gate.weight.t() + ad.gate.bias)
            if mode == "sequence":
                g = g.mean(1, keepdim=True)
            f = F.relu(z @ ad.adapter_down[0].weight.t() + ad.adapter_down[0].bias) @ ad.adapter_up.weight.t() \
                + ad.adapter_up.bias
            ref_out = F.layer_norm(r + g * f, (d,), ln.weight, ln.bias, ln.eps)
            dy = torch.randn_like(ref_out)
            ref_out.backward(dy)
            ref_grads = [t.grad.clone() for t in params]
    c = peftops.dispatch_counts()
    assert c.get("adapter.triton") == 1 and not c.get("adapter.reference"), c
    if c.get("adapter.path:kernel"):  # the eager path (CUDA's table for training) launches nothing
        assert c.get("launch.adapter_fwd") and c.get("launch.adapter_bwd_rows"), c


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_gated_prefix_module_gate_and_bad_input(mode):
    gp = GatedPrefix(32, 2, 8, 10, prefix_projection=False, gate_mode=mode, device=DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    q, k, v = (torch.randn(2, h, 7, 8, device=DEVICE) for h in (4, 2, 2))
    out = gp(q, k, v, x, is_causal=True)
    expect_g = torch.sigmoid(x @ gp.gate.weight.t() + gp.gate.bias)
    expect_g = expect_g.mean(1) if mode == "sequence" else expect_g
    assert gp.last_gate.shape == ((2, 2) if mode == "sequence" else (2, 7, 2))
    assert_close("gate", gp.last_gate, expect_g, 1e-6)
    pk, pv = gp.prefix()[0]
    assert_close("out", out, reference.prefix_attention(q, k, v, pk, pv, prefix_gate=expect_g, is_causal=True), 1e-5)
    with pytest.raises(ValueError, match="hidden_states"):
        gp(q, k, v, x[0])


def test_module_bad_args():
    with pytest.raises(TypeError, match="nn.Linear"):
        GatedLoraLinear(nn.Conv1d(2, 2, 1, device=DEVICE))
    with pytest.raises(ValueError, match="r must be"):
        GatedLoraLinear(nn.Linear(4, 4, device=DEVICE), r=0)
    with pytest.raises(ValueError, match="gate_mode"):
        GatedLoraLinear(nn.Linear(4, 4, device=DEVICE), gate_mode="x")
    with pytest.raises(ValueError, match="gate_mode"):
        GatedBottleneckAdapter(32, gate_mode="x", device=DEVICE)


# ------------------------------------------------------------------ whole block
HID, HEADS, KV_HEADS, HEAD_DIM, FFN = 48, 4, 2, 12, 64


class Block(nn.Module):
    """A plain post-LN attention + FFN block (GQA), optionally with UniPELT's submodules."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HID, HEADS * HEAD_DIM)
        self.k_proj = nn.Linear(HID, KV_HEADS * HEAD_DIM)
        self.v_proj = nn.Linear(HID, KV_HEADS * HEAD_DIM)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HID)
        self.ln1 = nn.LayerNorm(HID)
        self.up = nn.Linear(HID, FFN)
        self.down = nn.Linear(FFN, HID)
        self.ln2 = nn.LayerNorm(HID)
        self.pelt = None

    def add_unipelt(self, config):
        self.pelt = UniPELTLayer(config, q_proj=self.q_proj, v_proj=self.v_proj, hidden_size=HID,
                                 num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)

    def forward(self, x, causal=False):
        B, T, _ = x.shape
        p = self.pelt
        q = (p.q_proj if p else self.q_proj)(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = (p.v_proj if p else self.v_proj)(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if p:
            a = p.attention(q, k, v, x, is_causal=causal)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        x1 = self.ln1(self.o_proj(a.transpose(1, 2).reshape(B, T, -1)) + x)
        f = self.down(F.gelu(self.up(x1)))
        return p.adapter(f, x1, self.ln2) if p else self.ln2(f + x1)


def plain_unipelt_block(P, x, causal, mode):
    """The same block with UniPELT, written out in plain PyTorch from the parameter dict P."""
    B, T, _ = x.shape
    lin = lambda z, n: z @ P[n + ".weight"].t() + P[n + ".bias"]  # noqa: E731

    def gate(z, n, per_sample):
        g = torch.sigmoid(lin(z, n))
        return g.mean(1, keepdim=True) if per_sample else g

    def lora(z, n, base):
        g = gate(z, f"pelt.{n}.gate", mode == "sequence")
        return lin(z, base) + g * ((z @ P[f"pelt.{n}.lora_A"].t()) @ P[f"pelt.{n}.lora_B"].t())

    q = lora(x, "q_proj", "q_proj").view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
    k = lin(x, "k_proj").view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = lora(x, "v_proj", "v_proj").view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    emb = P["pelt.prefix.prefix.embedding.weight"]
    table = lin(torch.tanh(lin(emb, "pelt.prefix.prefix.transform.0")), "pelt.prefix.prefix.transform.2")
    L = emb.shape[0]
    kv = table.view(L, 2, KV_HEADS, HEAD_DIM)
    pk, pv = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)                  # [Hkv, L, D]
    gp = gate(x, "pelt.prefix.gate", mode == "sequence")                         # [B, 1 or T, 2]
    gk, gv = gp[:, None, :, 0, None], gp[:, None, :, 1, None]                    # [B, 1, 1 or T, 1]
    pk4, pv4 = pk.repeat_interleave(2, 0), pv.repeat_interleave(2, 0)            # GQA: [Hq, L, D]
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sp = (q @ pk4.transpose(-1, -2)) * gk / HEAD_DIM ** 0.5                      # row i: q_i (g_i Pk)^T
    ss = q @ kr.transpose(-1, -2) / HEAD_DIM ** 0.5
    if causal:
        ss = ss.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    pr = torch.softmax(torch.cat([sp, ss], -1), -1)
    a = (pr[..., :L] @ pv4) * gv + pr[..., L:] @ vr
    gp = gp[:, 0] if mode == "sequence" else gp
    ln = lambda z, n: F.layer_norm(z, (HID,), P[n + ".weight"], P[n + ".bias"])  # noqa: E731
    x1 = ln(lin(a.transpose(1, 2).reshape(B, T, -1), "o_proj") + x, "ln1")
    h = lin(F.gelu(lin(x1, "up")), "down")
    r = h + x1
    z = ln(r, "ln2")
    ga = gate(z, "pelt.adapter.gate", mode == "sequence")
    f = lin(torch.relu(lin(z, "pelt.adapter.adapter_down.0")), "pelt.adapter.adapter_up")
    return ln(r + ga * f, "ln2"), (ga, gp)


def make_block(mode, dtype=torch.float64):
    torch.manual_seed(1234)
    blk = Block()
    blk.add_unipelt(UniPELTConfig(gate_mode=mode, prefix_encoder_hidden_size=24))
    with torch.no_grad():  # non-zero LoRA B and adapter up (their inits would hide the branches)
        for n, p in blk.named_parameters():
            if n.endswith("lora_B") or n.startswith("pelt.adapter.adapter_up") or n.endswith("gate.weight"):
                p.normal_(0.0, 0.3)
    for n, p in blk.named_parameters():
        p.requires_grad_(n.startswith("pelt."))
    return blk.to(DEVICE, dtype)


def eager_grads(blk64, x64, dy, causal, dtype):
    """Gradients of the same block run by plain eager PyTorch in ``dtype`` (the reference backend)."""
    blk = make_block(blk64.pelt.config.gate_mode, dtype)
    blk.load_state_dict(blk64.state_dict())
    prev = os.environ["PEFTOPS_BACKEND"]
    os.environ["PEFTOPS_BACKEND"] = "reference"
    try:
        blk(x64.detach().to(dtype), causal).backward(dy.to(dtype))
    finally:
        os.environ["PEFTOPS_BACKEND"] = prev
    return {n: p.grad for n, p in blk.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode,causal,dtype", [
    ("sequence", True, torch.float32), ("token", False, torch.float32), ("token", True, torch.float32),
    ("sequence", False, torch.bfloat16), ("token", True, torch.bfloat16),
], ids=str)
def test_block_matches_plain_composition(mode, causal, dtype):
    blk64 = make_block(mode)
    assert blk64.pelt.adapter.bottleneck_size == HID // 16 and blk64.pelt.q_proj.r == 8
    assert blk64.pelt.prefix.prefix.num_virtual_tokens == 10
    x64 = randn(2, 13, HID).requires_grad_()
    P = dict(blk64.named_parameters())
    ref, (ga, gp) = plain_unipelt_block(P, x64, causal, mode)
    dy = torch.randn_like(ref)
    ref.backward(dy)

    blk = make_block(mode, dtype)
    blk.load_state_dict(blk64.state_dict())
    x = x64.detach().to(dtype).requires_grad_()
    peftops.reset_dispatch_counts()
    out = blk(x, causal)
    out.backward(dy.to(dtype))
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a whole block of roundings (DESIGN half bound)
    assert out.dtype == dtype
    assert_close("out", out, ref, bound)
    assert_close("dx", x.grad, x64.grad, bound)
    trainable = [n for n, p in blk.named_parameters() if p.requires_grad]
    assert len(trainable) == 21  # q, v: A, B, gate w, b; prefix: 5 + gate 2; adapter: 4 + gate 2
    eager = eager_grads(blk64, x64, dy, causal, dtype) if dtype != torch.float32 else {}
    for n, p in blk.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        # In bf16 a few gradients are ill-conditioned on a given draw (a gate's scalars: sums of
        # sigmoid' times cancelling dot products; the adapter's down weight when a relu input
        # sits near 0): plain eager bf16 PyTorch misses the float64 values by up to ~1e-1 there
        # too. Such a gradient must be no worse than 1.5x eager bf16's error.
        b = max(bound, 1.5 * rel_err(eager[n], P[n].grad)) if n in eager else bound
        assert_close(f"d{n}", p.grad, P[n].grad, b)
    gates = blk.pelt.last_gates()
    assert_close("adapter gate", gates["adapter"], ga, 1e-5 if dtype == torch.float32 else 1e-2)
    assert_close("prefix gate", gates["prefix"], gp, 1e-5 if dtype == torch.float32 else 1e-2)
    want = (2, 1, 1) if mode == "sequence" else (2, 13, 1)
    assert gates["lora_q"].shape == gates["lora_v"].shape == gates["adapter"].shape == want
    assert gates["prefix"].shape == ((2, 2) if mode == "sequence" else (2, 13, 2))
    c = peftops.dispatch_counts()
    assert c.get("gated_lora.triton") == 2 and c.get("prefix_attention.triton") == 1 and c.get("adapter.triton") == 1, c
    kerns = ["lora_skinny"]
    # each op's launches by the path its table picked on this device (kernel on CPU)
    kerns += ["adapter_fwd", "adapter_bwd_rows"] if c.get("adapter.path:kernel") else []
    kerns += ["lora_gemm"] if c.get("gated_lora.path:kernel") else []
    kerns += ["lora_rank_add"] if c.get("gated_lora.path:cublas") else []
    kerns += [] if c.get("prefix_attention.path:sdpa") else ["prefix_attn_fwd", "prefix_attn_bwd_dkdv"]
    for kern in kerns:
        assert c.get(f"launch.{kern}"), (kern, c)


def test_gated_lora_opcheck_and_compile():
    from peftops.ops import unipelt as up

    a = {n: t.float() for n, t in gl_args((2, 5), 16, 12, 8).items()}
    fwd_args = (a["x"].view(10, 16), a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["gate_weight"],
                a["gate_bias"], 1.0, "sequence", [5])
    torch.library.opcheck(up.gated_lora_fwd, fwd_args)
    y, s_ext, g = up.gated_lora_fwd(*fwd_args)
    torch.library.opcheck(up.gated_lora_bwd, (torch.randn_like(y), a["x"].view(10, 16), a["weight"], a["lora_A"],
                                              a["lora_B"], a["gate_weight"], a["gate_bias"], s_ext, g, 1.0,
                                              "sequence", [5], True))
    t = {n: v.detach().requires_grad_(n != "weight" and n != "bias") for n, v in a.items()}
    fn = lambda **k: gated_lora_linear(**k, gate_mode="token")[0]  # noqa: E731
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(**t)
    m64 = {n: v.detach().double().requires_grad_(t[n].requires_grad) for n, v in t.items()}
    want = reference.gated_lora_linear(**m64, gate_mode="token")[0]
    assert_close("y", out, want, BOUNDS[torch.float32])
    wrt = [n for n in t if t[n].requires_grad]
    got = torch.autograd.grad(out.square().sum(), [t[n] for n in wrt])
    exp = torch.autograd.grad(want.square().sum(), [m64[n] for n in wrt])
    for n, g1, g2 in zip(wrt, got, exp):
        assert_close(f"d{n}", g1, g2, BOUNDS[torch.float32])
