"""peft's mixed-adapter batches (``adapter_names=``) on an accelerated model run on
``peftops.lora_linear_multi``: logits, greedy ``generate`` tokens and every adapter's
gradient equal to peft's own mixed batch; peft's errors unchanged; the adapter stacks kept
in step with peft's parameters. fp32, IEEE dots, tiny config-built Llama."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peftops  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from parity import DEVICE, rel_err  # noqa: E402

TOL = 1e-4
NAMES = ["one", "__base__", "two", "three"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.2)
    return model


def three_adapters():
    """Adapters of ranks 4 / 8 / 2 on different target modules; plain peft and an accelerated copy."""
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="one")
    plain.add_adapter("two", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj"]))
    plain.add_adapter("three", LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "gate_proj", "down_proj"]))
    randomise(plain)
    fast = copy.deepcopy(plain)
    peftops.accelerate(fast)
    return plain.eval(), fast.eval()


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 1], [8, 8, 60, 2, 19, 33, 4], [100, 1, 2, 3, 4, 5, 6],
                    [9, 27, 81, 11, 13, 17, 19]])


def counts():
    return peftops.dispatch_counts()


def test_logits_and_generate_match_peft_mixed_batch():
    plain, fast = three_adapters()
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        want = plain(input_ids=ids, adapter_names=NAMES).logits
        peftops.reset_dispatch_counts()
        got = fast(input_ids=ids, adapter_names=NAMES).logits
    assert rel_err(got, want) <= TOL
    c = counts()
    assert not c.get("accelerate.lora.peft_forward"), c
    assert c.get("lora_multi.triton") == 2 * 7 - 2, c  # every LoRA layer but up_proj (2 layers: 6 of 7 targeted)
    # the per-adapter rows differ from the base rows: the adapters really act
    with torch.no_grad():
        base = plain(input_ids=ids, adapter_names=["__base__"] * 4).logits
    assert rel_err(got[0], base[0]) > 1e-3 and rel_err(got[1], base[1]) <= TOL

    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want_tok = plain.generate(input_ids=ids[:, :4], adapter_names=NAMES, **gen)
    peftops.reset_dispatch_counts()
    got_tok = fast.generate(input_ids=ids[:, :4], adapter_names=NAMES, **gen)
    assert torch.equal(got_tok, want_tok)
    c = counts()
    assert not c.get("accelerate.lora.peft_forward") and c.get("launch.lora_multi_expand"), c


def test_gradients_of_every_adapter_match_peft():
    """Several adapters trained in one batch (layer-level: peft refuses adapter_names in training
    mode at the model level, so the model stays in eval mode with every adapter trainable)."""
    plain, fast = three_adapters()
    ids = IDS.to(DEVICE)
    grads = []
    for model in (plain, fast):
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            p.grad = None
        y = model(input_ids=ids, adapter_names=NAMES).logits
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[1][n] is not None, n
        assert rel_err(grads[1][n], grads[0][n]) <= TOL, n
    assert any("lora_A.three" in n and grads[1][n].abs().sum() > 0 for n in grads[1])


def test_peft_errors_stay_peft():
    plain, fast = three_adapters()
    ids = IDS.to(DEVICE)
    for model in (plain, fast):
        with pytest.raises(ValueError, match="non-existing adapter"):
            model(input_ids=ids, adapter_names=["one", "nope", "two", "two"])
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            model(input_ids=ids, adapter_names=NAMES)
        model.eval()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            layer(torch.randn(3, 5, 64, device=DEVICE), adapter_names=["one", "two"])
        model.merge_adapter(["one"])
        with pytest.raises(ValueError, match="merged adapters"):
            model(input_ids=ids, adapter_names=NAMES)
        model.unmerge_adapter()


def test_stack_follows_peft_parameters():
    """In-place updates, add / delete adapter: the cached stacks are rebuilt; unchanged: reused."""
    plain, fast = three_adapters()
    ids = IDS.to(DEVICE)

    def same():
        with torch.no_grad():
            return rel_err(fast(input_ids=ids, adapter_names=NAMES).logits,
                           plain(input_ids=ids, adapter_names=NAMES).logits) <= TOL

    assert same()
    built = counts().get("accelerate.lora_multi.stack_built", 0)
    assert same() and counts().get("accelerate.lora_multi.stack_built", 0) == built  # kept
    for model in (plain, fast):  # an optimiser-style in-place step on one adapter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B.two" in n:
                    p.add_(0.3)
    assert same() and counts().get("accelerate.lora_multi.stack_built", 0) > built
    for model in (plain, fast):
        model.add_adapter("four", LoraConfig(r=3, target_modules=["q_proj"]))
        randomise(model, seed=5)
    peftops.accelerate(fast)
    global NAMES
    saved, NAMES = NAMES, ["four", "three", "one", "__base__"]
    try:
        assert same()
        for model in (plain, fast):
            model.delete_adapter("one")
        NAMES = ["four", "three", "two", "__base__"]
        assert same()
        built = counts().get("accelerate.lora_multi.stack_built", 0)
        for model in (plain, fast):  # a dtype move: the stacks follow (float64: the op's visible fallback)
            model.to(torch.float64)
        assert same() and counts().get("accelerate.lora_multi.stack_built", 0) > built
        assert counts().get("lora_multi.fallback"), counts()
    finally:
        NAMES = saved
    assert not counts().get("accelerate.lora.peft_forward"), counts()


@pytest.mark.parametrize("distinct", [8])
def test_layer_launch_count_same_for_2_and_8_adapters(distinct):
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(37, 29).to(DEVICE)
    layer = PeftLinear(base, "a0", LoraConfig(r=4, lora_alpha=4), r=4, lora_alpha=4)
    for i in range(1, 8):
        layer.update_layer(f"a{i}", 1 + i, 2, config=LoraConfig(r=1 + i, lora_alpha=2))
    layer.eval()
    randomise(layer)
    peftops.accelerate(layer)
    x = torch.randn(16, 5, 37, device=DEVICE)
    seen = {}
    for n in (2, distinct):
        names = [f"a{i % n}" for i in range(16)]
        peftops.reset_dispatch_counts()
        with torch.no_grad():
            layer(x, adapter_names=names)
        seen[n] = {k: v for k, v in counts().items() if k.startswith("launch.")}
    assert seen[2] == seen[distinct] and seen[2].get("launch.lora_multi_shrink") == 1, seen


def test_ia3_mixed_batch_as_peft():
    """IA3 has no mixed batches in peft: whatever peft does with ``adapter_names=`` (here: the
    name list never reaches its layers), the accelerated model does the same."""
    from peft import IA3Config

    plain = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g).to(p.device) * 0.3)
    fast = copy.deepcopy(plain)
    peftops.accelerate(fast)
    outcome = []
    for model in (plain, fast):
        try:
            with torch.no_grad():
                outcome.append(model(input_ids=IDS.to(DEVICE), adapter_names=["default", "__base__"] * 2).logits)
        except Exception as e:  # noqa: BLE001 -- the same error either way
            outcome.append((type(e), str(e)))
    if isinstance(outcome[0], torch.Tensor):
        assert isinstance(outcome[1], torch.Tensor) and rel_err(outcome[1], outcome[0]) <= TOL
    else:
        assert outcome[1] == outcome[0]


def test_disabled_adapters_win_over_adapter_names():
    plain, fast = three_adapters()
    ids = IDS.to(DEVICE)
    with torch.no_grad(), plain.disable_adapter(), fast.disable_adapter():
        want = plain(input_ids=ids, adapter_names=NAMES).logits
        got = fast(input_ids=ids, adapter_names=NAMES).logits
    assert rel_err(got, want) <= TOL
    assert not counts().get("accelerate.lora.peft_forward"), counts()


def test_bf16_base_fp32_adapters():
    """peft's default over a bf16 model: fp32 adapters (autocast_adapter_dtype); the stack stays
    fp32 and the kernels read it as it is. Within bf16 rounding of peft's own mixed batch."""
    plain = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="one")
    plain.add_adapter("two", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    randomise(plain).eval()
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.lora_A["one"].weight.dtype == torch.float32
    fast = copy.deepcopy(plain)
    peftops.accelerate(fast).eval()
    ids = IDS.to(DEVICE)
    names = ["two", "__base__", "one", "two"]
    with torch.no_grad():
        want = plain(input_ids=ids, adapter_names=names).logits
        got = fast(input_ids=ids, adapter_names=names).logits
        ref = copy.deepcopy(plain).float().eval()(input_ids=ids, adapter_names=names).logits
    assert rel_err(got, ref) <= max(2e-2, 1.5 * rel_err(want, ref) + 1e-3)
    assert not counts().get("accelerate.lora.peft_forward") and counts().get("lora_multi.triton"), counts()


def test_unsupported_mixed_batches_go_to_peft_counted():
    """Dropout in training mode (a layer-level call: peft's model refuses training mode) and
    lora_bias: peft's forward, counted, same numbers."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    for kw in (dict(lora_dropout=0.5), dict(lora_bias=True)):
        base = torch.nn.Linear(37, 29).to(DEVICE)
        layer = PeftLinear(base, "a0", LoraConfig(r=4, **kw), r=4, lora_alpha=4)
        layer.update_layer("a1", 2, 2, config=LoraConfig(r=2, **kw))
        randomise(layer)
        fast = copy.deepcopy(layer)
        peftops.accelerate(fast)
        x = torch.randn(6, 37, device=DEVICE)
        names = ["a0", "a1", "__base__"] * 2
        if "lora_dropout" in kw:
            layer.train(), fast.train()
        peftops.reset_dispatch_counts()
        torch.manual_seed(1)
        want = layer(x, adapter_names=names)
        torch.manual_seed(1)
        got = fast(x, adapter_names=names)
        assert rel_err(got, want) <= TOL
        assert counts().get("accelerate.lora.peft_forward") == 1 and not counts().get("lora_multi.triton"), counts()
