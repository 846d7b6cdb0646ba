"""AdapterHub benchmark cases: a BERT-base-sized encoder (hidden 768, 12 heads, FFN 3072,
2 layers, B = 8, T = 512) set up with AdapterHub's ``adapters``, with ``seq_bn`` (reduction
16), ``Fuse`` of 3 ``seq_bn`` adapters (fusion trained, adapters frozen) or ``UniPELT``
(gated LoRA + gated prefix + gated adapter): AdapterHub's eager forward vs the same model
after ``peftops.accelerate``. Forward (no autograd) and forward + backward (gradients of
every trainable parameter). ``small``: hidden 32, 4 heads, FFN 48, B = 2, T = 7 (the CPU
parity pass, peftops vs eager).

Providers: ``eager`` (AdapterHub's own modules), ``peftops`` (accelerated in place),
``cublas_base`` (the same model with no adapter active: the floor). Where ``adapters`` is
not installed (it pins transformers~=4.57; the GPU image has the newest), every provider
raises ``ModuleNotFoundError`` saying so, which the runner records as the provider's
``error`` (the case is skipped, with that reason), and the parity pass lists the cases as
timing only.
"""
from __future__ import annotations

import importlib.util
import sys

import torch

from .core import Case

SKIP_REASON = ("skipped: AdapterHub's `adapters` is not installed here (pip install 'peftops[adapterhub]'; it "
               "pins transformers~=4.57, so it has its own environment)")

SETUPS = ("seq_bn", "fuse3", "unipelt")


def _available() -> bool:
    if sys.modules.get("adapters") is not None:  # (adapters is a lazy module: __spec__ None once imported)
        return True
    try:
        return importlib.util.find_spec("adapters") is not None
    except (ImportError, ValueError):
        return False


def _model(setup, dims, device, dtype):
    import adapters
    from adapters import SeqBnConfig, UniPELTConfig
    from adapters.composition import Fuse
    from transformers import BertConfig, BertModel

    hid, heads, ffn, layers = dims
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hid, num_attention_heads=heads, intermediate_size=ffn, num_hidden_layers=layers,
                     vocab_size=512, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False)
    adapters.init(model)
    if setup == "seq_bn":
        model.add_adapter("a", config=SeqBnConfig(reduction_factor=16))
        model.train_adapter("a")
    elif setup == "fuse3":
        for n in ("a", "b", "c"):
            model.add_adapter(n, config=SeqBnConfig(reduction_factor=16))
        model.add_adapter_fusion(Fuse("a", "b", "c"))
        model.train_adapter_fusion(Fuse("a", "b", "c"))
    else:
        model.add_adapter("u", config=UniPELTConfig())
        model.train_adapter("u")
    with torch.no_grad():  # non-zero up projections / LoRA B so every branch is real work
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.to(device=device, dtype=dtype).train()


def _build(setup, dims, B, T, device, dtype, *, provider, backward):
    def build():
        if not _available():
            raise ModuleNotFoundError(SKIP_REASON)
        model = _model(setup, dims, device, dtype)
        if provider == "peftops":
            import peftops

            peftops.accelerate(model)
        elif provider == "cublas_base":
            model.set_active_adapters(None)
        ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
        dout = torch.randn(B, T, dims[0], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        if provider == "cublas_base":  # nothing trainable is reached: the base's own backward (to the embeddings)
            model.embeddings.word_embeddings.weight.requires_grad_(True)
            wrt = [model.embeddings.word_embeddings.weight]
        else:
            # (not the fusion key bias: its gradient is exactly zero in math, ours is 0 and AdapterHub's
            # rounding noise, which a relative comparison cannot take)
            wrt = [p for n, p in model.named_parameters()
                   if p.requires_grad and not (n.endswith("key.bias") and "fusion" in n)]

        def run():
            if not backward:
                with torch.no_grad():
                    return model(input_ids=ids).last_hidden_state
            return torch.autograd.grad(model(input_ids=ids).last_hidden_state, wrt, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        dims, B, T = (32, 4, 48, 2), 2, 7
    else:
        dims, B, T = (768, 12, 3072, 2), 8, 512
    hid, heads, ffn, layers = dims
    N = B * T
    base = layers * (2.0 * N * 4 * hid * hid + 4.0 * N * hid * ffn + 4.0 * B * heads * T * T * (hid // heads))
    ok = _available()
    out = []
    for setup in SETUPS:
        for backward, tag in ((False, "fwd"), (True, "fwd_bwd")):
            out.append(Case(
                op=f"adapterhub_{setup}_{tag}",
                shape={"setup": setup, "B": B, "T": T, "hidden": hid, "heads": heads, "ffn": ffn, "layers": layers},
                dtype=dtype,
                providers={p: _build(setup, dims, B, T, device, dtype, provider=p, backward=backward)
                           for p in ("peftops", "eager", "cublas_base")},
                flops=(3.0 if backward else 1.0) * base,
                compare=("peftops",) if ok else (),
            ))
    return out
