"""``peftops.accelerate(model)`` for AdapterHub (``adapters``) models: the same class-swap
design as for peft (``accelerate.py``), one level down, at AdapterHub's per-adapter modules.

AdapterHub keeps its composition logic (Stack, Parallel, BatchSplit, Average, Fuse, Split)
in each layer's ``compose_*`` methods, which call one adapter module per adapter. So:

* each bottleneck adapter module (``adapters.methods.modeling.Adapter`` /
  ``ParallelAdapter``) becomes ``PeftopsAdapter`` / ``PeftopsParallelAdapter`` (a subclass:
  the same object at the same path, the same Parameters, buffers and state_dict keys) whose
  ``forward`` runs ``peftops.bottleneck_adapter``; AdapterHub's ``pre_forward`` /
  ``post_forward`` (original LN before / after, residual_before_ln) stay AdapterHub's;
* each module holding bottleneck adapters (``BottleneckLayer``: BERT's ``BertOutput``
  with its mixin, Llama's hooked ``attention_adapters`` ...) gets a per-class subclass whose
  ``compose_fuse`` runs the children through ``peftops.bottleneck_adapter`` and the fusion
  through ``peftops.adapter_fusion`` (the rest of its compose logic is AdapterHub's);
* each LoRA-wrapped linear (``LoRALinearTorch``) becomes ``PeftopsLoRALinear`` whose
  ``forward`` runs ``peftops.lora_linear`` (``LoRAConfig``, ``composition_mode="add"``),
  ``peftops.gated_lora_linear`` (a gated LoRA, UniPELT's) or ``peftops.ia3_linear``
  (``IA3Config``, ``composition_mode="scale"``) when one adapter of this layer is active;
* on Llama (whose AdapterHub attention calls the configured transformers attention function
  after ``self.prefix_tuning``), each ``PrefixTuningLayer`` becomes
  ``PeftopsPrefixTuningLayer``, which hands the (gated) prefix to a registered attention
  function running ``peftops.prefix_attention`` instead of concatenating it (flat or
  reparameterised prefixes, UniPELT's and MAM's prefix halves); the model's
  ``_attn_implementation`` becomes ``peftops_adapterhub_prefix_<eager|sdpa>``, which runs the
  previous implementation whenever no prefix is handed over.

A case the kernels do not take at run time (adapter dropout in training, a composition of
several LoRAs in one layer, Fuse over nested blocks, fusion attention outputs requested,
another input dtype, autocast ...) runs AdapterHub's own forward, counted as
``dispatch_counts()["adapterhub.<kind>.adapterhub_forward"]`` and ``...:<reason>``.
Modules never swapped (Compacter's PHM layers, channel scaling, stochastic depth, VeRA /
MTL-LoRA / DoRA, prefix tuning outside Llama, prompt tuning, ReFT, invertible adapters) are
listed in the summary with the reason. ``deaccelerate(model)`` restores every class.
"""
from __future__ import annotations

import dataclasses
import logging
import threading

import torch
import torch.nn as nn

from .. import _dispatch
from . import _summary
from ..ops.adapter import ACTIVATIONS
from ..ops.adapter import bottleneck_adapter
from ..ops.fusion import adapter_fusion
from ..ops.ia3 import ia3_linear
from ..ops.lora import lora_linear
from ..ops.prefix_attention import prefix_attention
from ..ops.unipelt import gated_lora_linear

from adapters.composition import AdapterCompositionBlock, Fuse, Stack
from adapters.context import ForwardContext
from adapters.methods.adapter_layer_base import AdapterLayerBase
from adapters.methods.bottleneck import BottleneckLayer
from adapters.methods.lora import IA3, LoRA, LoRALinearTorch
from adapters.methods.modeling import Adapter, BertFusion, ParallelAdapter
from adapters.methods.prefix_tuning import PrefixTuningLayer

log = logging.getLogger("peftops")

__all__ = ["is_adapterhub_model", "accelerate", "deaccelerate", "AdapterHubSummary", "PeftopsAdapter",
           "PeftopsParallelAdapter", "PeftopsLoRALinear"]


def is_adapterhub_model(model) -> bool:
    """True for a model set up by ``adapters.init`` or an ``AutoAdapterModel``."""
    from adapters.model_mixin import ModelAdaptersMixin

    return isinstance(model, nn.Module) and (isinstance(model, ModelAdaptersMixin) or any(
        isinstance(m, ModelAdaptersMixin) for m in model.modules()))


def _count(kind: str, reason: str) -> None:
    _dispatch._bump(f"adapterhub.{kind}.adapterhub_forward")
    _dispatch._bump(f"adapterhub.{kind}.adapterhub_forward:{reason}")
    log.debug("peftops adapterhub %s: AdapterHub's own forward: %s", kind, reason)


def _input_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dtype != weight.dtype:
        return "input dtype differs from the adapter weight's"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    return None


# While > 0 (AdapterHub's own compose_fuse is running), adapters return AdapterHub's full
# (output, down, up) triple: its Fuse reads ``up``.
_local = threading.local()


def _adapterhub_depth() -> int:
    return getattr(_local, "depth", 0)


# ---------------------------------------------------------------------- bottleneck adapters
def _bn_linear(adapter) -> nn.Linear:
    return adapter.adapter_down[1 if adapter.add_layer_norm_before else 0]


def _bn_reason(adapter) -> str | None:
    """Why this AdapterHub bottleneck adapter cannot be accelerated (None if it can)."""
    mods = list(adapter.adapter_down)
    if any(type(m).__name__ == "PHMLayer" for m in mods) or type(adapter.adapter_up).__name__ == "PHMLayer":
        return "PHM layers (Compacter): no peftops kernel for the Kronecker-factored projections"
    if type(_bn_linear(adapter)) is not nn.Linear or type(adapter.adapter_up) is not nn.Linear:
        return "down / up projections are not nn.Linear"
    act = adapter.non_linearity.f
    name = getattr(adapter, "_peftops_act", None) or _act_name(act)
    if name is None:
        return f"non-linearity {type(act).__name__} has no peftops kernel (kernels: {sorted(ACTIVATIONS)})"
    if isinstance(adapter.scaling, nn.Parameter) and adapter.scaling.numel() != 1:
        return "channel scaling (one learned factor per feature): not a scalar scaling or gate"
    if hasattr(adapter, "DropPath"):
        return "stochastic depth (DropPath): not in the kernel"
    return None


def _act_name(f) -> str | None:
    """The kernel's activation for AdapterHub's activation function object (None: none)."""
    from transformers import activations as A

    kinds = [(nn.ReLU, "relu"), (A.GELUActivation, "gelu"), (A.NewGELUActivation, "gelu_new"),
             (A.GELUTanh if hasattr(A, "GELUTanh") else A.PytorchGELUTanh, "gelu_new"),
             (nn.SiLU, "silu"), (getattr(A, "SiLUActivation", nn.SiLU), "silu")]
    for cls, name in kinds:
        if type(f) is cls:
            if name == "gelu" and getattr(f, "act", None) not in (None, nn.functional.gelu):
                return None  # GELUActivation(use_gelu_python=True) is the same erf form, but stay strict
            return name
    if f is nn.functional.relu or f is torch.relu:
        return "relu"
    return None


class _PeftopsBottleneck:
    """The peftops forward shared by the sequential and the parallel adapter."""

    _peftops_kind = "bottleneck"

    def _peftops_runtime_reason(self, x, output_gating) -> str | None:
        if _adapterhub_depth():
            return "inside AdapterHub's own Fuse (it needs the up-projection output)"
        if self.training and self.dropout.p > 0:
            return "adapter dropout in training"
        return _input_reason(x, _bn_linear(self).weight)

    def _peftops_gate(self, x):
        """(gate tensor or None, Python scaling, sigmoid gate or None): learned scaling and
        AdapterHub's per-sample gate ride in the op's differentiable gate."""
        gate, scaling, g = None, 1.0, None
        if isinstance(self.scaling, nn.Parameter):
            gate = self.scaling.view(*([1] * x.dim()))
        else:
            scaling = float(self.scaling)
        if self.use_gating:
            # AdapterHub: mean over dim 1 (the sequence) of sigmoid(gate(x)), per sample.
            g = torch.mean(torch.sigmoid(self.gate(x)), dim=1).unsqueeze(-1)
            gate = g if gate is None else gate * g
        return gate, scaling, g

    def _peftops_up(self, x, residual, gate, scaling):
        """``residual + gate * scaling * up(act(down(LN_before(x))))`` on the peftops op."""
        h = self.adapter_norm_before(x) if self.add_layer_norm_before else x
        lin = _bn_linear(self)
        if residual is None:
            residual = torch.zeros_like(h)
        return bottleneck_adapter(h, lin.weight, lin.bias, self.adapter_up.weight, self.adapter_up.bias,
                                  residual=residual, activation=self._peftops_act, scaling=scaling, gate=gate)

    def _peftops_fuse_input(self, x, zeros):
        """AdapterHub's ``up`` (scaling * up-projection, before dropout and gate) for Fuse
        (``zeros``: a zero residual shaped like x, shared by the fused adapters)."""
        gate = self.scaling.view(*([1] * x.dim())) if isinstance(self.scaling, nn.Parameter) else None
        scaling = 1.0 if gate is not None else float(self.scaling)
        return self._peftops_up(x, zeros, gate, scaling)


class PeftopsAdapter(_PeftopsBottleneck, Adapter):
    """AdapterHub's sequential bottleneck ``Adapter`` whose forward runs
    ``peftops.bottleneck_adapter``. Returns ``(output, None, None)`` (AdapterHub: ``(output,
    down, up)``; inside peftops' Fuse the children's ``up`` comes from the op directly)."""

    def forward(self, x, residual_input, output_gating=False):
        reason = self._peftops_runtime_reason(x, output_gating)
        if reason is not None:
            _count("bottleneck", reason)
            return Adapter.forward(self, x, residual_input, output_gating)
        gate, scaling, g = self._peftops_gate(x)
        if not self.add_layer_norm_after:
            output = self._peftops_up(x, residual_input, gate, scaling)
        elif self.adapter_residual_before_ln:
            output = self.adapter_norm_after(self._peftops_up(x, residual_input, gate, scaling))
        else:
            output = self.adapter_norm_after(self._peftops_up(x, None, gate, scaling)) + residual_input
        if self.use_gating and output_gating:
            return output, None, None, g
        return output, None, None


class PeftopsParallelAdapter(_PeftopsBottleneck, ParallelAdapter):
    """AdapterHub's ``ParallelAdapter`` whose forward runs ``peftops.bottleneck_adapter``
    (its residual is added by AdapterHub's ``post_forward``, as in AdapterHub)."""

    def forward(self, x, residual_input, output_gating=False):
        reason = self._peftops_runtime_reason(x, output_gating)
        if reason is not None:
            _count("bottleneck", reason)
            return ParallelAdapter.forward(self, x, residual_input, output_gating)
        gate, scaling, g = self._peftops_gate(x)
        output = self._peftops_up(x, None, gate, scaling)
        if self.add_layer_norm_after:
            output = self.adapter_norm_after(output)
        if self.use_gating and output_gating:
            return output, None, None, g
        return output, None, None


_BN_CLASSES = {Adapter: PeftopsAdapter, ParallelAdapter: PeftopsParallelAdapter}


def _swap_bottleneck(adapter) -> str | None:
    """Swap one AdapterHub bottleneck adapter to its peftops class; the reason if not."""
    if type(adapter) not in _BN_CLASSES:
        return None if type(adapter) in _BN_CLASSES.values() else f"{type(adapter).__name__}: not a bottleneck adapter"
    reason = _bn_reason(adapter)
    if reason is None:
        adapter._peftops_act = _act_name(adapter.non_linearity.f)
        adapter.__class__ = _BN_CLASSES[type(adapter)]
    return reason


# ---------------------------------------------------------------------- Fuse (per layer class)
def _fusion_reason(layer, setup: Fuse, fusion) -> str | None:
    children = [c for c in setup if isinstance(c, AdapterCompositionBlock) or c in layer.adapters]
    if not children:
        return "no fused adapter in this layer"
    if any(isinstance(c, AdapterCompositionBlock) for c in children):
        return "Fuse over nested composition blocks"
    if not all(type(layer.adapters[c]) in _BN_CLASSES.values() for c in children):
        return "a fused adapter is not accelerated (see the summary)"
    if fusion is None or type(fusion) is not BertFusion:
        return "fusion layer missing or not AdapterHub's BertFusion"
    cfg = fusion.config
    if not (cfg["query"] and cfg["key"] and cfg["value"]):
        return "fusion without query / key / value projections"
    if cfg["residual_before"]:
        return "fusion residual_before=True"
    if fusion.training and fusion.dropout.p > 0:
        return "fusion attention-score dropout in training"
    ctx = ForwardContext.get_context()
    if ctx is not None and (getattr(ctx, "output_adapter_fusion_attentions", False)
                            or getattr(ctx, "output_adapter_gating_scores", False)):
        return "fusion attentions / gating scores requested"
    for c in children:
        a = layer.adapters[c]
        if a.training and a.dropout.p > 0:
            return "adapter dropout in training"
    return None


def _compose_fuse(self, adapter_setup: Fuse, state, lvl: int = 0):
    """``BottleneckLayer.compose_fuse`` with each child's up-projection on
    ``peftops.bottleneck_adapter`` and the fusion on ``peftops.adapter_fusion``."""
    original = type(self)._peftops_original
    fusion = self.adapter_fusion_layer[adapter_setup.name] if adapter_setup.name in self.adapter_fusion_layer else None
    reason = _fusion_reason(self, adapter_setup, fusion)
    if reason is None:
        reason = _input_reason(state.hidden_states, fusion.query.weight)
    if reason is not None:
        _count("fusion", reason)
        _local.depth = _adapterhub_depth() + 1
        try:
            return original.compose_fuse(self, adapter_setup, state, lvl)
        finally:
            _local.depth -= 1
    fusion_config, _ = self.adapters_config.get_fusion(adapter_setup.name)
    last = adapter_setup.last()
    hidden_states, query, residual = self.adapters[last].pre_forward(
        state.hidden_states, state.input_tensor, state.layer_norm, fusion_config=fusion_config)
    state = state._replace(hidden_states=hidden_states, adapter_residual=residual)
    zeros = torch.zeros_like(hidden_states)
    ups = [self.adapters[c]._peftops_fuse_input(hidden_states, zeros) for c in adapter_setup if c in self.adapters]
    out = adapter_fusion(query, torch.stack(ups, dim=-2), residual, fusion.query.weight, fusion.query.bias,
                         fusion.key.weight, fusion.key.bias, fusion.value.weight, temperature=float(fusion.T))
    fusion.T = max(fusion.T - fusion.reduction, 1.0)  # AdapterHub's temperature schedule
    return state._replace(hidden_states=out, last=last)


def _add_adapter(self, adapter_name: str, layer_idx: int) -> bool:
    """``BottleneckLayer.add_adapter``; an adapter added after ``accelerate`` is swapped too."""
    added = type(self)._peftops_original.add_adapter(self, adapter_name, layer_idx)
    if added:
        _swap_bottleneck(self.adapters[adapter_name])
    return added


_LAYER_CLASSES: dict[type, type] = {}  # AdapterHub holder class -> its peftops subclass


def _layer_class(cls: type) -> type:
    sub = _LAYER_CLASSES.get(cls)
    if sub is None:
        sub = type(f"Peftops{cls.__name__}", (cls,), {"compose_fuse": _compose_fuse, "add_adapter": _add_adapter,
                                                     "_peftops_original": cls, "__module__": __name__})
        _LAYER_CLASSES[cls] = sub
    return sub


# ---------------------------------------------------------------------- LoRA / IA3 / gated LoRA
def _lora_module_reason(lora) -> str | None:
    if type(lora) is IA3:
        return "gated (IA)^3: no gated ia3 kernel" if lora.use_gating else None
    if type(lora) is not LoRA:
        return f"{type(lora).__name__} (VeRA / MTL-LoRA): no peftops kernel"
    if lora.use_dora:
        return "DoRA: no peftops kernel"
    return None


class PeftopsLoRALinear(LoRALinearTorch):
    """AdapterHub's LoRA-wrapped ``nn.Linear`` whose forward runs ``peftops.lora_linear`` /
    ``gated_lora_linear`` / ``ia3_linear`` when exactly one of its adapters is active."""

    def forward(self, input_states: torch.Tensor):
        if self.merged:
            return LoRALinearTorch.forward(self, input_states)
        setup = self.get_active_setup()
        if setup is None:
            return LoRALinearTorch.forward(self, input_states)
        name, reason = self._peftops_single(setup)
        lora = self.loras[name] if name is not None else None
        if reason is None:
            reason = _lora_module_reason(lora) or _input_reason(input_states, self.weight)
        if reason is None and lora.use_gating and input_states.dim() < 2:
            reason = "gated LoRA needs a [..., T, in] input"
        if reason is None and lora.use_gating and lora.training and isinstance(lora.lora_dropout, nn.Dropout):
            reason = "gated LoRA with dropout in training"
        if reason is not None:
            _count("lora", reason)
            return LoRALinearTorch.forward(self, input_states)
        x, w, b = input_states, self.weight, self.bias
        if type(lora) is IA3:
            scale = lora.lora_B if lora.scaling == 1.0 else lora.lora_B * lora.scaling
            return ia3_linear(x, w, b, scale, feedforward=False)
        if lora.use_gating:
            y, g = gated_lora_linear(x, w, b, lora.lora_A, lora.lora_B, lora.gate.weight, lora.gate.bias,
                                     scaling=1.0, gate_mode="sequence")
            ctx = ForwardContext.get_context()
            if ctx is not None and getattr(ctx, "output_adapter_gating_scores", False):
                self._store_gating_score(name, g)
            return y
        p = lora.lora_dropout.p if lora.training and isinstance(lora.lora_dropout, nn.Dropout) else 0.0
        return lora_linear(x, w, b, lora.lora_A, lora.lora_B, float(lora.scaling), dropout_p=p)

    def _peftops_single(self, setup):
        """(the one active adapter of this layer, None) or (None, reason)."""
        if isinstance(setup, str):
            return (setup, None) if setup in self.loras else (None, "no active adapter here")
        if not isinstance(setup, Stack):
            return None, f"{type(setup).__name__} composition over LoRA"
        mine = [c for c in setup if isinstance(c, AdapterCompositionBlock) or c in self.loras]
        if len(mine) != 1 or isinstance(mine[0], AdapterCompositionBlock):
            return None, "several LoRA modules (or a nested block) active in one layer"
        return mine[0], None


def _lora_layer_reason(layer) -> str | None:
    if layer.fan_in_fan_out:
        return "fan_in_fan_out (Conv1D) weight layout"
    w = layer.weight
    if type(w) not in (torch.Tensor, nn.Parameter) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"base weight {type(w).__name__} {w.dtype} is not a plain float tensor"
    return None


_LORA_CLASSES = {LoRALinearTorch: PeftopsLoRALinear}

# ---------------------------------------------------------------------- prefix tuning (Llama)
# Model types whose AdapterHub attention calls ``self.prefix_tuning(...)`` and then the
# configured transformers attention function (so the prefix can be handed to our attention
# function instead of being concatenated), with whether that attention is causal. BERT /
# RoBERTa compute their attention inline in AdapterHub's modeling code: not routable.
_PREFIX_FAMILIES = {"llama": True}
_ATTN_PREFIX = "peftops_adapterhub_prefix_"


def _prefix_reason(layer, key_states, residual_input) -> tuple[str | None, str | None]:
    """(the one active prefix of this layer, None) or (None, reason)."""
    setup = layer.get_active_setup()
    if setup is None:
        return None, None
    if not str(layer.model_config._attn_implementation).startswith(_ATTN_PREFIX):
        return None, "the model's attention implementation was changed after accelerate"
    if not isinstance(setup, Stack):
        return None, f"{type(setup).__name__} composition over prefix tuning"
    mine = [c for c in setup if isinstance(c, AdapterCompositionBlock) or c in layer.prefixes]
    if len(mine) != 1 or isinstance(mine[0], AdapterCompositionBlock):
        return None, "several prefixes (or a nested block) active in one layer"
    if layer.training and float(getattr(layer.model_config, "attention_dropout", 0.0) or 0.0) > 0.0:
        return None, "attention dropout in training"
    if key_states.shape[2] != residual_input.shape[1]:
        return None, "KV cache (keys longer than the queries)"
    ctx = ForwardContext.get_context()
    if ctx is None or getattr(ctx, "output_adapter_gating_scores", False):
        return None, "no forward context, or gating scores requested"
    pk, _ = ctx.prefix_states[mine[0]][layer.location_key][layer.prefixes[mine[0]]]
    if pk.shape[0] != key_states.shape[0]:
        return None, "prefix batch differs from the keys' (Parallel / BatchSplit replication)"
    return mine[0], None


class PeftopsPrefixTuningLayer(PrefixTuningLayer):
    """AdapterHub's ``PrefixTuningLayer`` that hands the (gated) prefix of the one active
    prefix adapter to peftops' attention function (``_prefix_attention``: one
    ``peftops.prefix_attention`` call, no concatenation) instead of concatenating it."""

    def forward(self, key_states, value_states, residual_input, attention_mask=None, invert_mask=True):
        name, reason = _prefix_reason(self, key_states, residual_input)
        if name is None:
            if reason is not None:
                _count("prefix", reason)
            return PrefixTuningLayer.forward(self, key_states, value_states, residual_input, attention_mask,
                                             invert_mask)
        ctx = ForwardContext.get_context()
        pk, pv = ctx.prefix_states[name][self.location_key][self.prefixes[name]]
        gate = None
        if name in self.prefix_gates:  # AdapterHub: mean over the sequence of sigmoid(gate(x)), per sample
            gate = torch.mean(torch.sigmoid(self.prefix_gates[name](residual_input)), dim=1)
        _local.prefix = (key_states, pk, pv, gate)
        return key_states, value_states, attention_mask


def _prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function ``peftops_adapterhub_prefix_<impl>``: the prefix the
    layer above handed over through ``peftops.prefix_attention``; otherwise (no prefix, or a
    case it does not take) the model's previous implementation ``<impl>``."""
    import sys

    stash, _local.prefix = getattr(_local, "prefix", None), None
    prev = module.config._attn_implementation[len(_ATTN_PREFIX):]
    reason = None
    if stash is not None and stash[0] is not key:
        reason, stash = "keys changed between the prefix layer and the attention", None
    if stash is not None:
        if dropout > 0.0:
            reason = "attention dropout in training"
        elif key.shape[2] != query.shape[2]:
            reason = "KV cache (keys longer than the queries)"
        elif scaling is not None and abs(scaling * query.shape[-1] ** 0.5 - 1.0) > 1e-6:
            reason = f"attention scale {scaling} is not 1/sqrt(head_dim)"
        elif kwargs.get("sliding_window") is not None:
            reason = "sliding-window attention"
        else:
            reason = _input_reason(query, stash[1])
    if stash is not None and reason is None:
        _, pk, pv, gate = stash
        kpm = None
        if attention_mask is not None:
            last = attention_mask[:, 0, -1, :]  # the last query row sees every unpadded key
            kpm = last if last.dtype == torch.bool else last == 0
        causal = _PREFIX_FAMILIES[module.config.model_type]
        out = prefix_attention(query, key, value, pk, pv, prefix_gate=gate, is_causal=causal, key_padding_mask=kpm)
        return out.transpose(1, 2).contiguous(), None
    if stash is not None:  # the prefix was handed over but we cannot take it: AdapterHub's concatenation
        _count("prefix", reason)
        _, pk, pv, gate = stash
        if gate is not None:
            pk, pv = pk * gate[:, 0].view(-1, 1, 1, 1), pv * gate[:, -1].view(-1, 1, 1, 1)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is not None:
            pad = torch.ones(*attention_mask.shape[:-1], pk.shape[2], dtype=attention_mask.dtype,
                             device=attention_mask.device)
            pad = pad if attention_mask.dtype == torch.bool else torch.zeros_like(pad)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
    if prev == "eager":
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS[prev]
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _route_prefix_attention(model) -> str | None:
    """Switch the model's attention implementation to ours (wrapping the current one);
    the reason if the model's attention cannot be routed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    cfg = model.config
    if cfg.model_type not in _PREFIX_FAMILIES:
        return (f"prefix tuning on {cfg.model_type}: AdapterHub computes this attention inline (no attention "
                f"function to route; peftops routes {sorted(_PREFIX_FAMILIES)}): AdapterHub's own")
    prev = str(cfg._attn_implementation)
    if prev.startswith(_ATTN_PREFIX):
        return None
    if prev not in ("eager", "sdpa"):
        return f"prefix tuning with attention implementation {prev!r}: AdapterHub's own (peftops routes eager, sdpa)"
    name = _ATTN_PREFIX + prev
    AttentionInterface.register(name, _prefix_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[prev])
    cfg._attn_implementation = name
    if cfg._attn_implementation != name:  # pragma: no cover (a transformers without the setter)
        return "could not switch the attention implementation"
    return None


def _unroute_prefix_attention(model) -> None:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        impl = str(getattr(cfg, "_attn_implementation", ""))
        if impl.startswith(_ATTN_PREFIX):
            cfg._attn_implementation = impl[len(_ATTN_PREFIX):]


# What is never taken: AdapterHub layer class name -> reason (listed when it holds an adapter).
_NOT_TAKEN = {
    "LoRAMergedLinear": "merged q/k/v LoRA (GPT-2 c_attn style): no peftops mapping",
    "PromptTuningLayer": "prompt tuning (soft prompt embeddings): no kernel to accelerate",
    "ReftLayer": "ReFT: no peftops kernel",
    "InvertibleAdapterLayer": "invertible adapters (NICE / GLOW): no peftops kernel",
}


# ---------------------------------------------------------------------- accelerate
@dataclasses.dataclass
class AdapterHubSummary:
    swapped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> peftops class
    left: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> reason
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"peftops.accelerate (AdapterHub): swapped {len(self.swapped)} module(s), "
                 f"left {len(self.left)} as AdapterHub's own"]
        kinds: dict[str, int] = {}
        for cls in self.swapped.values():
            kinds[cls] = kinds.get(cls, 0) + 1
        lines += [f"  swapped {n} x {cls}" for cls, n in sorted(kinds.items())]
        lines += [f"  left {path}: {reason}" for path, reason in self.left.items()]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  at run time, cases the kernels do not take run AdapterHub's forward, counted in "
                     "dispatch_counts()['adapterhub.<kind>.adapterhub_forward']")
        return "\n".join(lines)


def accelerate(model: nn.Module, *, return_summary: bool = False):
    """Swap AdapterHub's bottleneck adapters, their holders (Fuse) and LoRA / IA3 linears of
    ``model`` to their peftops classes, in place (idempotent; adapters added later are
    taken by calling it again). Returns ``model`` (``model.peftops_summary`` set) or
    ``(model, summary)``."""
    if not is_adapterhub_model(model):
        raise TypeError(f"{type(model).__name__} is not an AdapterHub model (adapters.init(model) first)")
    summary = AdapterHubSummary()
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _BN_CLASSES.values() or cls in _LORA_CLASSES.values():
            summary.swapped[path] = cls.__name__
        elif cls in _BN_CLASSES:
            reason = _swap_bottleneck(module)
            if reason is None:
                summary.swapped[path] = module.__class__.__name__
            else:
                summary.left[path] = reason
        elif cls in _LORA_CLASSES:
            reason = _lora_layer_reason(module)
            if reason is None:
                module.__class__ = _LORA_CLASSES[cls]
                summary.swapped[path] = module.__class__.__name__
                for name, lora in module.loras.items():
                    why = _lora_module_reason(lora)
                    if why is not None:
                        summary.left[f"{path}.loras.{name}"] = why + " (AdapterHub's forward when active)"
            else:
                summary.left[path] = reason
        elif cls is PeftopsPrefixTuningLayer:
            summary.swapped[path] = cls.__name__
        elif cls is PrefixTuningLayer and len(module.prefixes):
            reason = _route_prefix_attention(_config_owner(model, module))
            if reason is None:
                module.__class__ = PeftopsPrefixTuningLayer
                summary.swapped[path] = module.__class__.__name__
            else:
                summary.left[path] = f"{reason} (adapters {sorted(module.prefixes)})"
        elif isinstance(module, BottleneckLayer) and not hasattr(cls, "_peftops_original"):
            module.__class__ = _layer_class(cls)  # compose_fuse only: not listed as a kernel swap
        elif isinstance(module, AdapterLayerBase) and len(getattr(module, module.adapter_modules_name, ())):
            if isinstance(module, BottleneckLayer) or cls in _LORA_CLASSES.values():
                continue
            name = next((c.__name__ for c in cls.__mro__ if c.__name__ in _NOT_TAKEN), None)
            held = sorted(getattr(module, module.adapter_modules_name).keys())
            summary.left[path] = f"{_NOT_TAKEN.get(name, f'{cls.__name__}: no peftops mapping')} (adapters {held})"
    if str(getattr(getattr(model, "config", None), "_attn_implementation", "")) == _ATTN_PREFIX + "sdpa":
        summary.notes.append(
            "prefix attention now runs peftops.prefix_attention (every query sees the whole prefix, as AdapterHub's "
            "eager attention computes); AdapterHub 1.3's own sdpa path drops the prefix for early queries (is_causal "
            "over L + T keys, inverted bool prefix mask), so outputs differ from AdapterHub-with-sdpa there")
    return _summary.attach(model, summary, "AdapterHub adapters", return_summary)


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every swapped module gets AdapterHub's class back (in place)."""
    back = {v: k for k, v in {**_BN_CLASSES, **_LORA_CLASSES, PrefixTuningLayer: PeftopsPrefixTuningLayer}.items()}
    for module in model.modules():
        cls = type(module)
        if cls in back:
            module.__class__ = back[cls]
        elif "_peftops_original" in vars(cls):
            module.__class__ = cls._peftops_original
    _unroute_prefix_attention(model)
    return model


def _config_owner(model, layer):
    """The module whose ``config`` the prefix layer's attention reads (the base model)."""
    base = getattr(model, "base_model", model)
    return base if hasattr(base, "config") else model
