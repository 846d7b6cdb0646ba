"""Native injection (``peftops.add_adapter``) into tiny, config-built BERT and Llama models.

* wiring: at one layer, the hooked model equals METHODS.md's placement formula written out
  in float64 (pfeiffer / houlsby / parallel, AdapterFusion), output and gradients;
* the whole model with the kernels (Triton, on the test device) equals the same model on the
  plain-PyTorch reference path: logits and every trainable gradient within 1e-4 (fp32);
* training freezes the base and trains the adapter; save / load round trip.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import peftops  # noqa: E402
from peftops.integrations import inject  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM  # noqa: E402

from parity import DEVICE, assert_dispatched, rel_err  # noqa: E402

TOL = 1e-4
PLACEMENTS = ["pfeiffer", "houlsby", "parallel"]
ACT = {"relu": F.relu, "swish": F.silu, "silu": F.silu}


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)).to(DEVICE).eval()


def tiny_roberta(seed=0):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    return RobertaModel(RobertaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=128, max_position_embeddings=80, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).to(DEVICE).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).to(DEVICE).eval()


def randomise_adapters(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n or ".adapter_fusion." in n:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def f64(ad, z):
    """s * f(z) in float64 from the adapter's own parameters."""
    down, up = ad.adapter_down[0], ad.adapter_up
    a = ACT[ad.non_linearity](z @ down.weight.double().t() + down.bias.double())
    return ad.scaling * (a @ up.weight.double().t() + up.bias.double())


def ln64(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


def z64(placement, h, x_in, ln):
    if placement == "pfeiffer":
        return ln(h + x_in) if ln else h + x_in
    return h if placement == "houlsby" else x_in


# ----------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bert_site_equals_placement_formula(placement):
    model = tiny_bert()
    peftops.add_adapter(model, "ad", placement)
    randomise_adapters(model)
    layer = model.encoder.layer[1]
    locs = ["attention", "output"] if placement == "houlsby" else ["output"]
    assert [n for n in ("attention", "output") if "ad" in layer.get_submodule(
        "attention.output" if n == "attention" else "output").adapters] == locs
    g = torch.Generator().manual_seed(2)
    for site in (["attention", "output"]):
        block = layer.attention.output if site == "attention" else layer.output
        d_in = block.dense.in_features
        hs = torch.randn(2, 5, d_in, generator=g, dtype=torch.float64).to(DEVICE)
        x_in = torch.randn(2, 5, 64, generator=g, dtype=torch.float64).to(DEVICE)
        hs32, x32 = hs.float().requires_grad_(), x_in.float().requires_grad_()
        y = block(hs32, x32)
        hs64, x64 = hs.clone().requires_grad_(), x_in.clone().requires_grad_()
        h = hs64 @ block.dense.weight.double().t() + block.dense.bias.double()
        ln = lambda t: ln64(block.LayerNorm, t)  # noqa: E731
        if site in locs:
            ad = block.adapters["ad"]
            ref = ln(h + f64(ad, z64(placement, h, x64, ln)) + x64)
        else:
            ref = ln(h + x64)
        dy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
        grads = torch.autograd.grad(y, [hs32, x32], dy.float())
        ref_grads = torch.autograd.grad(ref, [hs64, x64], dy)
        assert rel_err(y, ref) <= 1e-5, (site, rel_err(y, ref))
        for a, b in zip(grads, ref_grads):
            assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_llama_layer_equals_placement_formula(placement):
    model = tiny_llama()
    peftops.add_adapter(model, "ad", inject.BottleneckConfig(placement=placement, reduction_factor=4))
    randomise_adapters(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    pe = model.model.rotary_emb(x, torch.arange(6, device=DEVICE)[None].expand(2, 6))
    y = layer(x, position_embeddings=pe, attention_mask=None)
    y = y[0] if isinstance(y, tuple) else y
    inject.set_active_adapters(model, None)  # the plain sublayers, then the formula by hand
    with torch.no_grad():
        x64 = x.double()
        attn = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pe,
                               attention_mask=None)[0].double()
        if placement == "houlsby":
            attn = attn + f64(layer.self_attn.adapters["ad"], attn)
        x1 = x64 + attn
        m = layer.mlp(layer.post_attention_layernorm(x1.float())).double()
        ref = x1 + m + f64(layer.mlp.adapters["ad"], z64(placement, m, x1, None))
        plain = layer(x, position_embeddings=pe, attention_mask=None)
        plain = plain[0] if isinstance(plain, tuple) else plain
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(plain.double(), ref) > 1e-3  # the adapter changes the layer
    assert ("ad" in layer.self_attn.adapters) == (placement == "houlsby")


def test_bert_fusion_site_equals_formula():
    model = tiny_bert()
    for n in ("a1", "a2", "a3"):
        peftops.add_adapter(model, n, "pfeiffer")
    peftops.add_adapter(model, "fz", inject.FusionConfig(adapters=["a1", "a2", "a3"]))
    randomise_adapters(model, std=0.1)
    block = model.encoder.layer[0].output
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(2, 5, 96, generator=g, dtype=torch.float64).to(DEVICE)
    x_in = torch.randn(2, 5, 64, generator=g, dtype=torch.float64).to(DEVICE)
    y = block(hs.float(), x_in.float())
    ln = lambda t: ln64(block.LayerNorm, t)  # noqa: E731
    fz = block.adapter_fusion["fz"]
    h = hs @ block.dense.weight.double().t() + block.dense.bias.double()
    z = ln(h + x_in)
    u = torch.stack([f64(block.adapters[n], z) for n in ("a1", "a2", "a3")], dim=-2)   # [.., N, d]
    q = z @ fz.query.weight.double().t() + fz.query.bias.double()
    k = u @ fz.key.weight.double().t() + fz.key.bias.double()
    v = u @ fz.value.weight.double().t()
    a = torch.softmax((q[..., None, :] * k).sum(-1), dim=-1)
    ref = ln(h + (a[..., None] * v).sum(-2) + x_in)
    assert rel_err(y, ref) <= 1e-5
    c = peftops.dispatch_counts()
    assert_dispatched(c, "adapter_fusion", kernel_launches=["fusion_fwd"])
    assert c.get("adapter.triton", 0) >= 3, c
    assert_dispatched(c, "adapter", kernel_launches=["adapter_fwd"])


# ----------------------------------------------------------------------------- kernels vs reference, whole model
def _fwd_bwd(model, causal):
    for p in model.parameters():
        p.grad = None
    if causal:
        out = model(input_ids=IDS, labels=IDS)
        y, loss = out.logits, out.loss
    else:
        y = model(input_ids=IDS).last_hidden_state
        loss = (y * torch.linspace(-1, 1, 64, device=y.device)).square().mean()
    loss.backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


SETUPS = ([("bert", p) for p in PLACEMENTS] + [("bert", "fusion")] + [("llama", p) for p in PLACEMENTS]
          + [("roberta", "houlsby")])
MAKERS = {"bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama}


@pytest.mark.parametrize("family,method", SETUPS)
def test_whole_model_kernels_equal_reference_path(family, method, monkeypatch):
    model = MAKERS[family]()
    if method == "fusion":
        peftops.add_adapter(model, "a1", "pfeiffer")
        peftops.add_adapter(model, "a2", "pfeiffer")
        peftops.add_adapter(model, "fz", inject.FusionConfig(adapters=["a1", "a2"]))
    else:
        peftops.add_adapter(model, "ad", method)
    randomise_adapters(model, std=0.1)
    model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    kind = "adapter_fusion" if method == "fusion" else "adapters"
    assert trainable and all(f".{kind}." in n for n in trainable)  # base frozen
    y, g = _fwd_bwd(model, family == "llama")
    assert_dispatched(peftops.dispatch_counts(), "adapter", kernel_launches=["adapter_fwd", "adapter_bwd_rows"])
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    y_ref, g_ref = _fwd_bwd(model, family == "llama")
    assert rel_err(y, y_ref) <= TOL
    assert g.keys() == g_ref.keys()
    live = 0
    for n in g:
        if g_ref[n].norm() < 1e-8:
            assert g[n].norm() < 1e-8, n
            continue
        live += 1
        assert rel_err(g[n], g_ref[n]) <= TOL, (n, rel_err(g[n], g_ref[n]))
    assert live >= 0.75 * len(g)


# ----------------------------------------------------------------------------- training, checkpoints
@pytest.mark.parametrize("method", PLACEMENTS + ["fusion"])
def test_bert_trains_adapter_only(method):
    model = tiny_bert()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "fusion":
        peftops.add_adapter(model, "a1", "pfeiffer")
        peftops.add_adapter(model, "a2", "pfeiffer")
        peftops.add_adapter(model, "tr", inject.FusionConfig(adapters=["a1", "a2"]))
    else:
        peftops.add_adapter(model, "tr", method)
    assert model.training
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = (model(input_ids=IDS).last_hidden_state - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
    kind = "adapter_fusion" if method == "fusion" else "adapters"
    moved = [n for n, p in model.named_parameters() if f".{kind}.tr." in n]
    assert moved and all(p.requires_grad for n, p in model.named_parameters() if n in moved)


def test_save_load_round_trip(tmp_path):
    model = tiny_bert()
    peftops.add_adapter(model, "a1", "houlsby")
    peftops.add_adapter(model, "a2", "houlsby")
    peftops.add_adapter(model, "fz", inject.FusionConfig(adapters=["a1", "a2"]))
    randomise_adapters(model)
    for n in ("a1", "a2", "fz"):
        peftops.save_adapter(model, tmp_path / n, n)
    assert {p.name for p in (tmp_path / "a1").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    with torch.no_grad():
        ref = model.eval()(input_ids=IDS).last_hidden_state
    fresh = tiny_bert()
    for n in ("a1", "a2", "fz"):
        assert peftops.load_adapter(fresh, tmp_path / n) == n
    with torch.no_grad():
        got = fresh.eval()(input_ids=IDS).last_hidden_state
    assert torch.equal(got, ref)
    other = tiny_llama()
    with pytest.raises(ValueError, match="does not match"):  # a BERT adapter into a Llama
        peftops.load_adapter(other, tmp_path / "a1")


def test_active_switching_delete_and_remove():
    model = tiny_bert()
    with torch.no_grad():
        plain = model(input_ids=IDS).last_hidden_state
    peftops.add_adapter(model, "a", "parallel")
    peftops.add_adapter(model, "b", "pfeiffer")
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        yb = model(input_ids=IDS).last_hidden_state
        peftops.set_active_adapters(model, "a")
        ya = model(input_ids=IDS).last_hidden_state
        peftops.set_active_adapters(model, ["a", "b"])
        yab = model(input_ids=IDS).last_hidden_state
        peftops.set_active_adapters(model, None)
        y0 = model(input_ids=IDS).last_hidden_state
    assert torch.equal(y0, plain)
    assert min(rel_err(ya, plain), rel_err(yb, plain), rel_err(yab, ya), rel_err(yab, yb)) > 1e-3
    inject.delete_adapter(model, "a")
    assert not any(".adapters.a." in n for n, _ in model.named_parameters())
    inject.remove_injection(model)
    assert not any("adapter" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).last_hidden_state, plain)


def test_bad_input():
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).to(DEVICE)
    with pytest.raises(ValueError, match="model_type"):
        peftops.add_adapter(gpt2, "a", "pfeiffer")
    model = tiny_bert()
    with pytest.raises(ValueError, match="placement"):
        peftops.add_adapter(model, "a", "sideways")
    peftops.add_adapter(model, "a", "pfeiffer")
    with pytest.raises(ValueError, match="already exists"):
        peftops.add_adapter(model, "a", "houlsby")
    with pytest.raises(ValueError, match="name"):
        peftops.add_adapter(model, "x.y", "houlsby")
    with pytest.raises(ValueError, match="FusionConfig.adapters"):
        peftops.add_adapter(model, "f", inject.FusionConfig(adapters=["a", "nope"]))
    peftops.add_adapter(model, "h", "houlsby")
    with pytest.raises(ValueError, match="placement"):
        peftops.add_adapter(model, "f", inject.FusionConfig(adapters=["a", "h"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        peftops.set_active_adapters(model, "zzz")
    with pytest.raises(TypeError, match="config"):
        peftops.add_adapter(model, "c", 3)


def test_native_adapter_on_accelerated_peft_lora_model():
    """Native adapters and peft LoRA (accelerated) on one model: both kinds run their kernels."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peftops.accelerate(model)
    peftops.add_adapter(model, "ad", "parallel")  # train=True: only the adapter trains now
    assert all(".adapters.ad." in n for n, p in model.named_parameters() if p.requires_grad)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    c = peftops.dispatch_counts()
    assert_dispatched(c, "lora", kernel_launches=["lora_gemm"], any_path_launches=["lora_skinny"])
    assert_dispatched(c, "adapter", kernel_launches=["adapter_fwd"])


# ----------------------------------------------------------------------------- UniPELT
UNI = dict(r=4, prefix_length=3, prefix_encoder_hidden_size=32, reduction_factor=4)


def randomise_trainable(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)


@pytest.mark.parametrize("gate_mode", ["sequence", "token"])
def test_unipelt_llama_layer_equals_composition(gate_mode, monkeypatch):
    """At one Llama layer (float64, reference path): gated LoRA on q / v, the gated prefix
    in attention (causal, GQA: 4 q heads over 2 kv heads) and the gated SeqBn adapter after
    the FFN, composed by hand from the injected submodules."""
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    model = tiny_llama().double()
    peftops.add_adapter(model, "uni", inject.UniPELTConfig(gate_mode=gate_mode, **UNI))
    randomise_trainable(model)
    model.eval()
    layer = model.model.layers[1]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    pe = model.model.rotary_emb(x, torch.arange(6, device=DEVICE)[None].expand(2, 6))
    y = layer(x, position_embeddings=pe, attention_mask=None)
    y = y[0] if isinstance(y, tuple) else y
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    att = layer.self_attn
    assert isinstance(att.q_proj, peftops.nn.unipelt.GatedLoraLinear)
    with torch.no_grad():
        hs = layer.input_layernorm(x)
        q = att.q_proj(hs).view(2, 6, 4, 16).transpose(1, 2)
        k = att.k_proj(hs).view(2, 6, 2, 16).transpose(1, 2)
        v = att.v_proj(hs).view(2, 6, 2, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        o = att.prefixes["uni"](q, k, v, hs, is_causal=True).transpose(1, 2).reshape(2, 6, 64)
        x1 = x + att.o_proj(o)
        m = layer.mlp.forward(layer.post_attention_layernorm(x1))  # .forward: without the injection hooks
        ref = layer.mlp.adapters["uni"].adapter(m + x1, m) + x1   # x1 + m + g_A s f(m + x1)
        inject.set_active_adapters(model, None)
        plain = layer(x, position_embeddings=pe, attention_mask=None)
        plain = plain[0] if isinstance(plain, tuple) else plain
    assert rel_err(y, ref) <= 1e-12
    assert rel_err(plain, ref) > 1e-3


def test_unipelt_bert_layer_equals_composition(monkeypatch):
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    model = tiny_bert().double()
    peftops.add_adapter(model, "uni", inject.UniPELTConfig(**UNI))
    randomise_trainable(model)
    model.eval()
    layer = model.encoder.layer[0]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[1, 4:] = 0  # padding in sample 1: hidden from every query, the prefix stays visible
    ext = mask[:, None, None, :].bool().expand(2, 1, 6, 6)
    y = layer(x, attention_mask=ext)
    y = y[0] if isinstance(y, tuple) else y
    sa = layer.attention.self
    with torch.no_grad():
        q, k, v = (lin(x).view(2, 6, 4, 16).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        ctx = sa.prefixes["uni"](q, k, v, x, key_padding_mask=mask).transpose(1, 2).reshape(2, 6, 64)
        a = layer.attention.output(ctx, x)
        out = layer.output
        h = out.dense(layer.intermediate(a))
        s = h + a
        ref = out.LayerNorm(out.adapters["uni"].adapter(out.LayerNorm(s), s))
    assert rel_err(y, ref) <= 1e-12


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_unipelt_whole_model_kernels_equal_reference_path(family, monkeypatch):
    model = tiny_bert() if family == "bert" else tiny_llama()
    peftops.add_adapter(model, "uni", inject.UniPELTConfig(**UNI))
    randomise_trainable(model)
    model.eval()
    assert all(".base_layer." not in n for n, p in model.named_parameters() if p.requires_grad)
    y, g = _fwd_bwd(model, family == "llama")
    c = peftops.dispatch_counts()
    assert_dispatched(c, "gated_lora", kernel_launches=["lora_gemm"], any_path_launches=["lora_skinny"])
    assert_dispatched(c, "prefix_attention", kernel_launches=["prefix_attn_fwd", "prefix_attn_bwd_dkdv"])
    assert_dispatched(c, "adapter", kernel_launches=["adapter_fwd"])
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    y_ref, g_ref = _fwd_bwd(model, family == "llama")
    assert rel_err(y, y_ref) <= TOL
    assert g.keys() == g_ref.keys() and len(g) >= 20
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= TOL, (n, rel_err(g[n], g_ref[n]))


def test_unipelt_trains_saves_loads_and_removes(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        plain = model(input_ids=IDS).last_hidden_state
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftops.add_adapter(model, "uni", inject.UniPELTConfig(**UNI))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = (model(input_ids=IDS).last_hidden_state - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}
    assert all(torch.equal(now[n], p) for n, p in base_before.items())  # the base is frozen
    peftops.save_adapter(model, tmp_path / "uni", "uni")
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=IDS).last_hidden_state
    fresh = tiny_bert().eval()
    peftops.load_adapter(fresh, tmp_path / "uni")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).last_hidden_state, ref)
    with pytest.raises(ValueError, match="one per model"):
        peftops.add_adapter(fresh, "uni2", inject.UniPELTConfig(**UNI))
    inject.remove_injection(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).last_hidden_state, plain)
    assert fresh.config._attn_implementation != "peftops_prefix"


def test_unipelt_bert_padding_mask_reaches_prefix_attention():
    """Per-token gates: a right-padded sequence's real tokens equal the unpadded sequence's
    outputs only if the padding mask reaches the prefix attention (kernels)."""
    model = tiny_bert()
    peftops.add_adapter(model, "uni", inject.UniPELTConfig(gate_mode="token", **UNI))
    randomise_trainable(model)
    model.eval()
    ids = IDS[:1]
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :6]
        short = model(input_ids=ids[:, :6]).last_hidden_state
        unmasked = model(input_ids=ids).last_hidden_state[:, :6]
    assert rel_err(padded, short) <= 1e-5
    assert rel_err(unmasked, short) > 1e-3  # the mask matters
    c = peftops.dispatch_counts()
    assert_dispatched(c, "prefix_attention")
    if not c.get("prefix_attention.path:sdpa"):  # per-token gates: the kernel on every device's table today
        assert c.get("launch.prefix_attn_fwd", 0) >= 6, c
