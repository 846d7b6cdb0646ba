"""Native injection of what HF PEFT lacks: bottleneck adapters, AdapterFusion and UniPELT
in transformers' BERT / RoBERTa and Llama-family (Llama, Mistral, Qwen2) models.

One mechanism for every family: a table (``FAMILIES``) says, per transformer layer and per
adapter location ("attention" = after the attention block, "output" = after the FFN),

* ``h``      the module whose output is the sublayer output h (before the residual add),
* ``x_in``   the module whose input is the residual stream x_in (argument index / name),
* ``ln``     the LayerNorm the model applies to ``h + x_in`` afterwards (post-LN BERT) or
             None (pre-LN Llama: the model just adds the residual),
* ``holder`` the module the adapters are attached to (their state_dict prefix).

A forward pre-hook on ``x_in``'s module stashes x_in; a forward hook on ``h``'s module
replaces h by ``h + s * f(z)`` (the fused ``peftops.bottleneck_adapter`` with residual = h),
and the model's own code then adds x_in and applies its LN, giving the placements of
METHODS.md exactly:

    pfeiffer  z = LN(h + x_in)  ->  LN(h + s f(LN(h + x_in)) + x_in)     (after FFN only)
    houlsby   z = h             ->  LN(h + s f(h) + x_in)                (attention and FFN)
    parallel  z = x_in          ->  LN(h + s f(x_in) + x_in)             (after FFN only)

(for Llama LN is the identity). Several active adapters are applied one after the other
(stacked: each sees the previous one's h). An active AdapterFusion over adapters
``[a_1..a_N]`` (same placement) replaces h by ``fusion(query=z, u_n = s_n f_n(z),
residual=h)`` = ``h + sum_n softmax_n(q . k_n / T) v_n``.

UniPELT (``UniPELTConfig``, one per model): the table's ``attention`` entry says where q, v
and the attention module are; q / v become ``GatedLoraLinear`` (the original Linear is their
``base_layer``), each attention module gets ``prefixes.<name>`` (a ``GatedPrefix``), and the
model's attention implementation is switched to ``"peftops_prefix"``, a registered
transformers attention function that runs ``peftops.prefix_attention`` with the gated prefix
(SDPA when UniPELT is inactive; masks in SDPA's format, key padding taken from them; no KV
cache, no attention-probability dropout); the gated SeqBn adapter sits after the FFN like
a pfeiffer adapter. ``remove_injection`` / ``delete_adapter`` restore all of it.

Parameter names: ``<holder>.adapters.<name>.adapter_down.0.weight`` ... (AdapterHub's
names for BERT: ``bert.encoder.layer.0.output.adapters.<name>....``) and
``<holder>.adapter_fusion.<name>.query.weight`` ...

API: ``add_adapter(model, name, config)``, ``set_active_adapters(model, names | fusion)``,
``train_adapter(model, name)`` (freeze everything else), ``delete_adapter``,
``remove_injection``; checkpoints in ``peftops.integrations.checkpoint``.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

from ..nn.adapter import _ALIASES, BottleneckAdapter
from ..nn.fusion import AdapterFusion
from ..nn.unipelt import GatedBottleneckAdapter, GatedLoraLinear, GatedPrefix, UniPELTConfig

log = logging.getLogger("peftops")

__all__ = ["BottleneckConfig", "FusionConfig", "UniPELTConfig", "FAMILIES", "add_adapter", "set_active_adapters",
           "train_adapter", "delete_adapter", "remove_injection", "adapter_configs"]


# ---------------------------------------------------------------------------- configs
@dataclasses.dataclass
class BottleneckConfig:
    """A bottleneck adapter (``peftops.BottleneckAdapter``); None = the placement's default."""
    placement: str = "pfeiffer"  # pfeiffer | houlsby | parallel (or seq_bn | double_seq_bn | par_bn)
    reduction_factor: float | None = None
    non_linearity: str | None = None
    scaling: float | str | None = None
    init_weights: str = "bert"
    method: str = "bottleneck"

    def __post_init__(self):
        p = str(self.placement).lower()
        self.placement = _ALIASES.get(p, p)
        if self.placement not in ("pfeiffer", "houlsby", "parallel"):
            raise ValueError(f"placement must be pfeiffer, houlsby or parallel, got {self.placement!r}")

    @property
    def locations(self) -> tuple[str, ...]:
        return ("attention", "output") if self.placement == "houlsby" else ("output",)


@dataclasses.dataclass
class FusionConfig:
    """AdapterFusion (``peftops.AdapterFusion``, AdapterHub's ``dynamic``) over ``adapters``."""
    adapters: list = dataclasses.field(default_factory=list)
    temperature: bool = False
    value_initialized: bool = True
    method: str = "fusion"


def config_from_dict(d: dict):
    d = dict(d)
    method = d.pop("method", "bottleneck")
    if method == "bottleneck":
        return BottleneckConfig(**d)
    if method == "fusion":
        return FusionConfig(**d)
    if method == "unipelt":
        return UniPELTConfig(**d)
    raise ValueError(f"unknown adapter method {method!r} in config {d}")


def config_to_dict(config) -> dict:
    method = "unipelt" if isinstance(config, UniPELTConfig) else config.method
    return {**dataclasses.asdict(config), "method": method}


def _as_config(config):
    if isinstance(config, (BottleneckConfig, FusionConfig, UniPELTConfig)):
        return config
    if isinstance(config, str):
        return BottleneckConfig(placement=config)
    if isinstance(config, dict):
        return config_from_dict(config)
    raise TypeError(f"config must be a BottleneckConfig, FusionConfig, dict or placement name, got {type(config).__name__}")


# ---------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Location:
    holder: str
    h: str
    x_in: tuple  # (module path, positional index, keyword name)
    ln: str | None


@dataclasses.dataclass(frozen=True)
class Attention:
    """Where UniPELT's gated LoRA (q, v) and gated prefix go."""
    module: str  # the attention module (its input, arg ``x_in[0]`` / ``x_in[1]``, feeds the prefix gate)
    x_in: tuple  # (positional index, keyword name)
    q: str
    v: str
    causal: bool


@dataclasses.dataclass(frozen=True)
class Family:
    layers: str  # path of the ModuleList of transformer layers, from the base model
    locations: dict
    attention: Attention


_BERT = Family("encoder.layer", {
    "attention": Location("attention.output", "attention.output.dropout", ("attention.output", 1, "input_tensor"),
                          "attention.output.LayerNorm"),
    "output": Location("output", "output.dropout", ("output", 1, "input_tensor"), "output.LayerNorm"),
}, Attention("attention.self", (0, "hidden_states"), "attention.self.query", "attention.self.value", causal=False))
_LLAMA = Family("layers", {
    "attention": Location("self_attn", "self_attn", ("input_layernorm", 0, "hidden_states"), None),
    "output": Location("mlp", "mlp", ("post_attention_layernorm", 0, "hidden_states"), None),
}, Attention("self_attn", (0, "hidden_states"), "self_attn.q_proj", "self_attn.v_proj", causal=True))
# config.model_type -> family
FAMILIES = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


# ---------------------------------------------------------------------------- state
class _Injection:
    """Per-model state (kept off the module tree: no parameters here)."""

    def __init__(self, family: Family, model_type: str):
        self.family = family
        self.model_type = model_type
        self.configs: dict[str, object] = {}
        self.active: list[str] = []
        self.sites: list[_Site] = []
        self.unipelt_name: str | None = None
        self.unipelt_lora: list[tuple[nn.Module, str, GatedLoraLinear]] = []  # (parent, attr, module)
        self.attn_sites: list[_AttnSite] = []
        self.prev_attn_impl: str | None = None

    def unipelt_active(self) -> bool:
        return self.unipelt_name is not None and self.unipelt_name in self.active


class _Site:
    """One location of one layer: the hooks and the holder of its adapters."""

    def __init__(self, state: _Injection, layer: nn.Module, loc_name: str, loc: Location):
        self.state, self.loc_name = state, loc_name
        self.holder = layer.get_submodule(loc.holder)
        self.ln = layer.get_submodule(loc.ln) if loc.ln else None
        self.x_in_idx, self.x_in_kw = loc.x_in[1], loc.x_in[2]
        self.x_in: torch.Tensor | None = None
        if not hasattr(self.holder, "adapters"):
            self.holder.adapters = nn.ModuleDict()
        if not hasattr(self.holder, "adapter_fusion"):
            self.holder.adapter_fusion = nn.ModuleDict()
        self.handles = [
            layer.get_submodule(loc.x_in[0]).register_forward_pre_hook(self._pre, with_kwargs=True),
            layer.get_submodule(loc.h).register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        self.x_in = args[self.x_in_idx] if len(args) > self.x_in_idx else kwargs[self.x_in_kw]

    def _post(self, module, args, output):
        if not self.state.active:
            return None
        tup = isinstance(output, tuple)
        h = output[0] if tup else output
        x_in, self.x_in = self.x_in, None
        if x_in is None:
            raise RuntimeError(f"peftops adapters at {self.loc_name}: the residual input was not seen "
                               "(the model's forward does not match the injection table)")
        h = self.apply(h, x_in)
        return (h, *output[1:]) if tup else h

    def _z(self, placement: str, h, x_in):
        if placement == "pfeiffer":
            s = h + x_in
            return self.ln(s) if self.ln is not None else s
        return h if placement == "houlsby" else x_in

    def apply(self, h: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        for name in self.state.active:
            cfg = self.state.configs[name]
            if isinstance(cfg, FusionConfig):
                if name not in self.holder.adapter_fusion:
                    continue
                members = [a for a in cfg.adapters if a in self.holder.adapters]
                placement = self.state.configs[members[0]].placement
                z = self._z(placement, h, x_in)
                zeros = torch.zeros_like(h)
                u = [self.holder.adapters[a].adapter(z, zeros) for a in members]  # u_n = s_n f_n(z)
                h = self.holder.adapter_fusion[name](z, u, h)
            elif name in self.holder.adapters:
                ad = self.holder.adapters[name]
                h = ad.adapter(self._z(ad.placement, h, x_in), h)  # h + s f(z)
        return h

    def remove(self):
        for hd in self.handles:
            hd.remove()


# ---------------------------------------------------------------------------- UniPELT
_ATTN_NAME = "peftops_prefix"


class _SwitchedGatedLora(GatedLoraLinear):
    """UniPELT's gated LoRA at q / v: the base layer alone while its UniPELT is inactive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._peftops_state.unipelt_active():
            return self.base_layer(x)
        return super().forward(x)


class _AttnSite:
    """Stashes the attention input (the prefix gate's input) for ``_prefix_attention``."""

    def __init__(self, state: _Injection, attn: nn.Module, spec: Attention):
        self.state, self.attn, self.causal = state, attn, spec.causal
        self.idx, self.kw = spec.x_in
        self.hidden: torch.Tensor | None = None
        attn.__dict__["_peftops_attn_site"] = self
        self.handle = attn.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.hidden = args[self.idx] if len(args) > self.idx else kwargs[self.kw]

    def remove(self):
        self.handle.remove()
        self.attn.__dict__.pop("_peftops_attn_site", None)
        if "prefixes" in self.attn._modules:
            del self.attn._modules["prefixes"]


def _prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (registered as ``"peftops_prefix"``): the gated prefix
    through ``peftops.prefix_attention`` while UniPELT is active, else torch SDPA. The mask
    arrives in SDPA's format (the mask function registered with it is SDPA's); its last
    query row is the key padding mask. Attention-probability dropout is not applied on
    the prefix path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    site = module.__dict__.get("_peftops_attn_site")
    if site is None or not site.state.unipelt_active():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError("UniPELT's prefix attention does not support a KV cache (generation with "
                                  "past_key_values); call the model with use_cache=False")
    if scaling is not None and abs(scaling * query.shape[-1] ** 0.5 - 1.0) > 1e-6:
        raise NotImplementedError(f"prefix attention uses scale 1/sqrt(head_dim); the model asks for {scaling}")
    kpm = None
    if attention_mask is not None:
        last = attention_mask[:, 0, -1, :]
        kpm = last if last.dtype == torch.bool else last == 0
    prefix = module.prefixes[site.state.unipelt_name]
    out = prefix(query, key, value, site.hidden, is_causal=site.causal, key_padding_mask=kpm)
    site.hidden = None
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _prefix_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)


def _set_attn_impl(model: nn.Module, name: str) -> None:
    cfg = _base(model).config
    cfg._attn_implementation = name
    if cfg._attn_implementation != name:  # pragma: no cover (a transformers without the setter)
        raise RuntimeError(f"could not switch the attention implementation to {name!r}")


def _add_unipelt(model: nn.Module, st: _Injection, name: str, config: UniPELTConfig, kw: dict) -> None:
    if st.unipelt_name is not None:
        raise ValueError(f"this model already has UniPELT adapter {st.unipelt_name!r} (one per model)")
    base = _base(model)
    cfg = base.config
    d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    spec = st.family.attention
    for layer in base.get_submodule(st.family.layers):
        for path in (spec.q, spec.v):
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            lora = _SwitchedGatedLora(getattr(parent, attr), config.r, gate_mode=config.gate_mode)
            lora._peftops_state = st
            setattr(parent, attr, lora)
            st.unipelt_lora.append((parent, attr, lora))
        attn = layer.get_submodule(spec.module)
        attn.prefixes = nn.ModuleDict({name: GatedPrefix(
            d, kv, head_dim, config.prefix_length, prefix_projection=config.prefix_projection,
            encoder_hidden_size=config.prefix_encoder_hidden_size, gate_mode=config.gate_mode, **kw)})
        st.attn_sites.append(_AttnSite(st, attn, spec))
    for site in st.sites:
        if site.loc_name == "output":
            site.holder.adapters[name] = GatedBottleneckAdapter(
                d, config.reduction_factor, gate_mode=config.gate_mode, placement="pfeiffer",
                non_linearity=config.adapter_non_linearity, **kw)
    _register_attention()
    st.prev_attn_impl = base.config._attn_implementation
    _set_attn_impl(model, _ATTN_NAME)
    st.unipelt_name = name


def _remove_unipelt(model: nn.Module, st: _Injection) -> None:
    for parent, attr, lora in st.unipelt_lora:
        setattr(parent, attr, lora.base_layer)
    for site in st.attn_sites:
        site.remove()
    for site in st.sites:
        if st.unipelt_name in site.holder.adapters:
            del site.holder.adapters[st.unipelt_name]
    if st.prev_attn_impl is not None:
        _set_attn_impl(model, st.prev_attn_impl)
    st.unipelt_lora, st.attn_sites, st.unipelt_name, st.prev_attn_impl = [], [], None, None


def _state(model: nn.Module, create: bool = True) -> _Injection:
    st = model.__dict__.get("_peftops_injection")
    if st is None:
        if not create:
            raise ValueError("no peftops adapters were added to this model (call peftops.add_adapter first)")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"peftops.add_adapter supports model_type in {sorted(FAMILIES)}; got {model_type!r} "
                             f"({type(model).__name__})")
        family = FAMILIES[model_type]
        st = _Injection(family, model_type)
        layers = _base(model).get_submodule(family.layers)
        for layer in layers:
            for loc_name, loc in family.locations.items():
                st.sites.append(_Site(st, layer, loc_name, loc))
        model.__dict__["_peftops_injection"] = st
    return st


def _base(model: nn.Module) -> nn.Module:
    """The transformers base model (``BertModel``, ``LlamaModel``), also through a peft
    ``PeftModel`` wrapper (native adapters and peft LoRA can share a model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


def _hidden_size(model) -> int:
    return int(model.config.hidden_size)


# ---------------------------------------------------------------------------- API
def add_adapter(model: nn.Module, name: str, config, *, set_active: bool = True, train: bool = True) -> nn.Module:
    """Add adapter (or fusion) ``name`` to a BERT / RoBERTa / Llama-family model, in place.

    ``config``: ``BottleneckConfig`` (or a placement name / dict), or ``FusionConfig``
    naming already-added adapters. ``set_active``: make it the active setup; ``train``:
    freeze every other parameter (the base model and other adapters) and train this one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    config = _as_config(config)
    st = _state(model)
    if name in st.configs:
        raise ValueError(f"adapter {name!r} already exists; have {list(st.configs)}")
    ref = next(model.parameters())
    kw = dict(device=ref.device, dtype=ref.dtype)
    d = _hidden_size(model)
    if isinstance(config, UniPELTConfig):
        _add_unipelt(model, st, name, config, kw)
    elif isinstance(config, BottleneckConfig):
        for site in st.sites:
            if site.loc_name in config.locations:
                site.holder.adapters[name] = BottleneckAdapter(
                    d, config.reduction_factor, placement=config.placement, non_linearity=config.non_linearity,
                    scaling=config.scaling, init_weights=config.init_weights, **kw)
    else:
        missing = [a for a in config.adapters if not isinstance(st.configs.get(a), BottleneckConfig)]
        if len(config.adapters) < 2 or missing:
            raise ValueError(f"FusionConfig.adapters must name >= 2 added bottleneck adapters; "
                             f"{missing or config.adapters} not usable (have {list(st.configs)})")
        placements = {st.configs[a].placement for a in config.adapters}
        if len(placements) != 1:
            raise ValueError(f"fused adapters must share one placement, got {sorted(placements)}")
        locs = st.configs[config.adapters[0]].locations
        for site in st.sites:
            if site.loc_name in locs:
                site.holder.adapter_fusion[name] = AdapterFusion(
                    d, temperature=config.temperature, value_initialized=config.value_initialized, **kw)
    st.configs[name] = config
    if set_active:
        set_active_adapters(model, name)
    if train:
        train_adapter(model, name)
    return model


def set_active_adapters(model: nn.Module, names: str | list[str] | None) -> None:
    """Active setup: one name, a list (stacked, in order) or None (the plain model)."""
    st = _state(model, create=False)
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; have {list(st.configs)}")
    st.active = names


def adapter_parameters(model: nn.Module, name: str, *, relative: bool = False) -> dict[str, nn.Parameter]:
    """``{state_dict key: Parameter}`` of adapter / fusion / UniPELT ``name`` (keys relative
    to the transformers base model with ``relative``)."""
    st = _state(model, create=False)
    if name not in st.configs:
        raise ValueError(f"unknown adapter {name!r}; have {list(st.configs)}")
    cfg = st.configs[name]
    own: set[int] = set()
    marks = [f".adapter_fusion.{name}."] if isinstance(cfg, FusionConfig) else [f".adapters.{name}."]
    if isinstance(cfg, UniPELTConfig):
        marks.append(f".prefixes.{name}.")
        for _, _, lora in st.unipelt_lora:
            own |= {id(p) for n, p in lora.named_parameters() if not n.startswith("base_layer.")}
    root = _base(model) if relative else model
    return {k: p for k, p in root.named_parameters() if id(p) in own or any(m in k for m in marks)}


def train_adapter(model: nn.Module, name: str) -> None:
    """Freeze every parameter except adapter / fusion ``name``'s (AdapterHub's
    ``train_adapter`` / ``train_adapter_fusion``); put the model in training mode."""
    keep = set(adapter_parameters(model, name).values())
    for p in model.parameters():
        p.requires_grad_(p in keep)
    model.train()


def delete_adapter(model: nn.Module, name: str) -> None:
    st = _state(model, create=False)
    if name not in st.configs:
        raise ValueError(f"unknown adapter {name!r}; have {list(st.configs)}")
    users = [f for f, c in st.configs.items() if isinstance(c, FusionConfig) and name in c.adapters]
    if users:
        raise ValueError(f"adapter {name!r} is used by fusion(s) {users}; delete those first")
    if name == st.unipelt_name:
        _remove_unipelt(model, st)
    for site in st.sites:
        for d in (site.holder.adapters, site.holder.adapter_fusion):
            if name in d:
                del d[name]
    del st.configs[name]
    st.active = [a for a in st.active if a != name]


def remove_injection(model: nn.Module) -> None:
    """Remove every hook and adapter: the plain model again."""
    st = _state(model, create=False)
    _remove_unipelt(model, st)
    for site in st.sites:
        site.remove()
        for attr in ("adapters", "adapter_fusion"):
            if attr in site.holder._modules:
                del site.holder._modules[attr]
    del model.__dict__["_peftops_injection"]


def adapter_configs(model: nn.Module) -> dict:
    st = _state(model, create=False)
    return dict(st.configs)
