"""End-to-end bench: one training step (forward, backward, AdamW update) of a Llama-style
model built from a config (random weights, no download) with LoRA r=16 on every linear
layer: plain peft vs peft + ``peftops.accelerate``, each eager and under ``torch.compile``.

``small=False``: ~1.1B parameters (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads,
4 kv heads, FFN 5632, vocab 32000), bf16, batch 4 x seq 2048 (as in shared/PERF.md); two
cases: LoRA weights in the model dtype (providers ``peft``, ``peftops``, ``compile`` = peft
under torch.compile, ``peftops_compile`` = peft + peftops under torch.compile), and in fp32
(peft's default ``autocast_adapter_dtype``; ``peft``, ``peftops``). torch.compile is applied
per decoder layer (``layer.compile()``, "regional compilation": the 22 identical layers
share one compiled graph, so it compiles in seconds instead of the ~100 s of the whole
model), in the build, warmed up there (timing excludes compilation). Each record has the
step's peak memory (``peak_total_bytes``: model, AdamW state of the LoRA weights, activations). The
bars (bench/targets.toml) compare these providers with each other.
``small=True``: the tiny Llama (hidden 64, 2 layers) for the CPU parity pass, peft vs
peftops only. Each provider returns ``(loss, *LoRA grads)`` so the same case serves GPU
timing and CPU parity.
"""
from __future__ import annotations

import torch

from .core import Case, dtype_name, raise_recompile_limits, warmed

SIZES = {
    # name: (LlamaConfig kwargs, batch, seq, LoRA r)
    "tiny": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64), 2, 16, 4),
    "medium": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048), 1, 1024, 16),
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048), 4, 2048, 16),
}


def build_model(size: str, device, dtype: torch.dtype, accelerated: bool, seed: int = 0, *,
                fp32_adapters: bool = False, dora: bool = False):
    """A peft LoRA model (r from ``SIZES``, alpha = 2r, all linear layers) over a randomly
    initialised Llama, LoRA B random (a trained state), optionally accelerated.
    ``fp32_adapters``: peft's default (``autocast_adapter_dtype=True``: LoRA weights in fp32
    over a half-precision base); else the adapters are in the model dtype. ``dora``: DoRA
    (``use_dora=True``; magnitudes moved off their init, as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_kw, _, _, r = SIZES[size]
    cfg = LlamaConfig(**cfg_kw)
    torch.manual_seed(seed)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=dora),
                           autocast_adapter_dtype=fp32_adapters)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * r ** -0.5)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    model.train()
    if accelerated:
        from ..integrations.accelerate import accelerate

        accelerate(model)
    return model


def compile_layers(model) -> int:
    """Regional compilation: ``torch.compile`` each decoder layer in place (the identical
    layers share one graph). Returns how many layers were compiled."""
    raise_recompile_limits()
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(dynamic=False)
            n += 1
    if not n:
        raise RuntimeError("no decoder layer found to compile")
    return n


def batch(size: str, device, seed: int = 0) -> torch.Tensor:
    cfg_kw, b, t, _ = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, cfg_kw["vocab_size"], (b, t), generator=g).to(device)


def step_fn(model, ids):
    """One training step: loss, the LoRA gradients, and an AdamW update of the LoRA weights
    (as the bars in shared/PERF.md were measured). Returns the loss and the gradients taken
    before the update, so a parity pass compares providers on their first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (loss.detach(), *grads)
    return step


def base_params(size: str) -> int:
    c = SIZES[size][0]
    d, f, L, h, kv, v = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                         c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"])
    attn = d * d * 2 + 2 * d * (d // h) * kv
    return L * (attn + 3 * d * f) + 2 * v * d


def cases(device, dtype, small: bool) -> list[Case]:
    size = "tiny" if small else "1b"
    cfg_kw, b, t, r = SIZES[size]

    def make(accelerated, fp32_adapters, compile_=False, dora=False):
        def build():
            model = build_model(size, device, dtype, accelerated, fp32_adapters=fp32_adapters, dora=dora)
            if compile_:
                compile_layers(model)
            return step_fn(model, batch(size, device))
        return warmed(build) if compile_ else build

    tokens = b * t
    n = base_params(size)
    # Frozen base: forward 2 N T + backward dx only 2 N T (no dW); attention not counted.
    flops = 4.0 * n * tokens
    variants = [False] if small or dtype == torch.float32 else [False, True]
    out = []
    for fp32 in variants:
        providers = {"peft": make(False, fp32), "peftops": make(True, fp32)}
        if not small and not fp32:
            providers.update({"compile": make(False, fp32, True), "peftops_compile": make(True, fp32, True)})
        out.append(Case(op="e2e_llama_lora_train_step",
                        shape=dict(size=size, batch=b, seq=t, r=r, params=n,
                                   adapters="fp32" if fp32 else dtype_name(dtype)), dtype=dtype,
                        providers=providers, flops=flops, bytes=2.0 * n * dtype.itemsize,
                        parity_with="peft", compare=("peftops",), iters=4))
    # DoRA (issue 17): the same step with use_dora=True, adapters in the model dtype; bars in
    # bench/targets.toml (step >= 1.6x faster than peft's, peak memory <= peft's).
    out.append(Case(op="e2e_llama_dora_train_step",
                    shape=dict(size=size, batch=b, seq=t, r=r, params=n, adapters=dtype_name(dtype)), dtype=dtype,
                    providers={"peft": make(False, False, dora=True), "peftops": make(True, False, dora=True)},
                    flops=flops, bytes=2.0 * n * dtype.itemsize, parity_with="peft", compare=("peftops",), iters=4))
    return out
