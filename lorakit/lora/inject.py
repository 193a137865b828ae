"""Which modules an adapter targets (PEFT's matching rules), and putting LoRA layers there.

``plan_injection`` is the dry run: it lists what ``inject`` would do and changes nothing.
``inject`` carries the plan out. Both use the same matching code, so the count a planner
prints is the count training gets.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, TargetError
from .adapters import adapter_names, check_adapter_name, set_active, set_bias_trainable, set_requires_grad
from .config import ALL_LINEAR, LoraConfig, moves_base
from .conv import LoraConv, check_conv, conv_shape
from .layer import Adapter, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .siblings import SIBLING_NAMES
from .tokens import TrainableTokens, tied_modules, token_targets

_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


@dataclass(frozen=True)
class Target:
    """One module an adapter will wrap. ``shape`` is (out, in) as in the LoRA math."""

    name: str
    kind: str  # "linear" | "conv1d" (transformers' Conv1D) | "conv" (nn.Conv1d) | "embedding"
    shape: tuple[int, int]
    r: int
    lora_alpha: float
    use_dora: bool = False

    @property
    def lora_params(self) -> int:
        return lora_param_count(self.r, self.shape, self.use_dora)


def lora_param_count(r: int, shape: tuple[int, int], use_dora: bool = False) -> int:
    """r·(d + k) for a (d, k) weight: A is (r, in), B is (out, r); DoRA adds its magnitude m, (d,)."""
    return r * (shape[0] + shape[1]) + (shape[0] if use_dora else 0)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but inject also serves plain PyTorch
        return ()
    return (Conv1D,)


def module_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (transformers' Conv1D), 'conv' (nn.Conv1d), 'embedding', or None when LoRA cannot
    wrap this module."""
    if isinstance(module, LoraConv):
        return "conv"
    if isinstance(module, LoraLinear):
        return "conv1d" if module.fan_in_fan_out else "linear"
    if isinstance(module, LoraEmbedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _conv1d_type()):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv1d):
        return "conv"
    return None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear (also a quantized one, whose weight is stored packed) or a Conv1D."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
    return (out_f, in_f)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → module, skipping the insides of existing LoRA wrappers."""
    inner = set()
    out = {}
    for name, module in model.named_modules():
        parts = name.split(".")  # look up each ancestor (depth) rather than scan every wrapper (count)
        if not name or any(".".join(parts[:i]) in inner for i in range(1, len(parts))):
            continue
        out[name] = module
        if isinstance(module, (LoraLayer, ModulesToSave, TrainableTokens)):
            inner.add(name)
    return out


def _output_head_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return set()
    if isinstance(head, LoraLayer):
        head = head.base_layer
    return {n for n, m in model.named_modules() if m is head or (isinstance(m, LoraLayer) and m.base_layer is head)}


def _matches_list(name: str, entries: list[str]) -> str | None:
    for entry in entries:
        if name == entry or name.endswith("." + entry):
            return entry
    return None


def _layer_index(name: str, layers_pattern) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    match = None
    if not patterns:
        match = _DEFAULT_LAYER_INDEX.match(name)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            break
    return int(match.group("idx")) if match else None


def _excluded(name: str, cfg: LoraConfig) -> bool:
    ex = cfg.exclude_modules
    if ex and (re.fullmatch(ex, name) if isinstance(ex, str) else _matches_list(name, ex)):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.modules_to_save or [])


def _select(modules: dict[str, nn.Module], cfg: LoraConfig, model: nn.Module) -> tuple[list[str], dict[str, int]]:
    """Names matched by cfg.target_modules, and how many modules each list entry matched."""
    tm = cfg.target_modules
    hits: dict[str, int] = {}
    if isinstance(tm, list):
        hits = dict.fromkeys(tm, 0)
    if tm == ALL_LINEAR:
        heads = _output_head_names(model)
        chosen = [n for n, m in modules.items() if module_kind(m) in ("linear", "conv1d") and n not in heads]
    elif isinstance(tm, str):
        if cfg.layers_to_transform is not None:
            raise TargetError("layers_to_transform has no effect with a regex target_modules; "
                              "put the layer indices in the regex, or give target_modules as a list")
        chosen = [n for n in modules if re.fullmatch(tm, n)]
    else:
        chosen = []
        for n in modules:
            entry = _matches_list(n, tm)
            if entry is not None:
                hits[entry] += 1
                chosen.append(n)
    if cfg.layers_to_transform is not None:
        chosen = [n for n in chosen if _layer_index(n, cfg.layers_pattern) in cfg.layers_to_transform]
    return [n for n in chosen if not _excluded(n, cfg)], hits


def _no_match_error(pattern: str, modules: dict[str, nn.Module]) -> TargetError:
    names = list(modules)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(pattern, leaves, n=5, cutoff=0.4) or difflib.get_close_matches(
        pattern, names, n=5, cutoff=0.4)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if module_kind(m)})
    hint = f"closest module names: {', '.join(close)}" if close else "no similar module names"
    return TargetError(f"target_modules entry {pattern!r} matches no module of the model ({hint}). "
                       f"Adaptable module names here: {', '.join(linear[:30])}")


def plan_injection(model: nn.Module, cfg: LoraConfig) -> list[Target]:
    """The modules ``inject(model, cfg)`` would adapt, with shapes and LoRA parameter counts.

    Changes nothing. Raises TargetError when a target pattern matches nothing or matches a
    module LoRA cannot wrap, and when r exceeds a module's smaller dimension.

    Args:
        model: any nn.Module (a transformers model or plain PyTorch).
        cfg: the LoraConfig whose target rules to apply.
    """
    modules = candidate_modules(model)
    chosen, hits = _select(modules, cfg, model)
    for entry, count in hits.items():
        if count == 0:
            raise _no_match_error(entry, modules)
    if not chosen:
        tm = cfg.target_modules
        if isinstance(tm, str) and tm != ALL_LINEAR and cfg.exclude_modules is None:
            raise _no_match_error(tm, modules)
        raise TargetError(f"no module is left to adapt: target_modules={tm!r} with exclude_modules="
                          f"{cfg.exclude_modules!r}, layers_to_transform={cfg.layers_to_transform!r}, "
                          f"modules_to_save={cfg.modules_to_save!r}")
    return [_target(n, modules[n], cfg) for n in chosen]


def _target(name: str, module: nn.Module, cfg: LoraConfig) -> Target:
    kind = module_kind(module)
    if kind is None:
        raise TargetError(f"module {name!r} is a {type(module).__name__}; lorakit adapts nn.Linear, "
                          "nn.Embedding, nn.Conv1d and transformers' Conv1D. Narrow target_modules to those.")
    if kind == "conv":
        base = module.base_layer if isinstance(module, LoraLayer) else module
        check_conv(name, base)
        shape = conv_shape(base)
    elif isinstance(module, LoraLayer):
        shape = (module.out_features, module.in_features)
    elif kind == "embedding":
        shape = (module.embedding_dim, module.num_embeddings)
    else:
        shape = linear_shape(module)
    r = cfg.rank_for(name)
    if r > min(shape):
        raise TargetError(f"r={r} is larger than module {name!r} allows: its weight is {shape[0]}x{shape[1]}, "
                          f"so r must be <= {min(shape)}. Lower r or use rank_pattern for this module.")
    return Target(name, kind, shape, r, cfg.alpha_for(name), cfg.use_dora)


def link_siblings(parent: nn.Module) -> None:
    """(Re)group the adapted Linear children of ``parent``; called whenever a child is (un)wrapped."""
    children = {name: m for name, m in parent.named_children() if isinstance(m, LoraLinear)}
    for m in children.values():
        m.siblings = ()
    for names in SIBLING_NAMES:
        found = [children[n] for n in sorted(names) if n in children]
        widths = {m.in_features for m in found}
        if len(found) > 1 and len(widths) == 1:
            group = tuple(found)  # a plain tuple: not registered as submodules, deep-copied consistently
            for m in found:
                m.siblings = group


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    link_siblings(parent)


def _wrap(model: nn.Module, name: str, module: nn.Module, kind: str) -> LoraLayer:
    if isinstance(module, LoraLayer):
        return module
    layer = {"embedding": LoraEmbedding, "conv": LoraConv}.get(kind, LoraLinear)(module)
    layer.train(module.training)  # a wrapper in an eval-mode model must not start dropping out
    _set_submodule(model, name, layer)
    return layer


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Give ``adapter_name`` a trainable copy of each module named in ``names``; returns their paths."""
    modules = candidate_modules(model)
    paths = []
    for entry in names:
        found = [n for n in modules if n == entry or n.endswith("." + entry)]
        if not found:
            raise _no_match_error(entry, modules)
        for path in found:
            wrapper = modules[path]
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                _set_submodule(model, path, wrapper)
            wrapper.add_adapter(adapter_name)
            paths.append(path)
    return paths






def add_trainable_tokens(model: nn.Module, spec: list[int] | dict[str, list[int]], adapter_name: str
                         ) -> dict[str, list[int]]:
    """Train rows of embeddings for ``adapter_name`` (PEFT's trainable_token_indices); a module sharing the
    table's weight (a tied output head) reads the same rows. Returns {embedding path: indices}."""
    modules = candidate_modules(model)
    targets = token_targets(model, spec, modules)
    for path, indices in targets.items():
        layer = modules[path]
        if isinstance(layer, (LoraLayer, ModulesToSave)):
            raise TargetError(f"{path!r} is already adapted by LoRA or trained in full (modules_to_save); train its "
                              "rows with trainable_token_indices or the whole table, not both")
        if not isinstance(layer, TrainableTokens):
            heads = tied_modules(model, layer.weight, path)
            layer = TrainableTokens(layer)
            _set_submodule(model, path, layer)
            for head in heads:
                _set_submodule(model, head, TrainableTokens(model.get_submodule(head), tied_to=layer))
        layer.add_adapter(adapter_name, indices)
    return targets


def inject(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``cfg`` targets, in place.

    Every parameter that is not LoRA (or a modules_to_save copy) is frozen; the new adapter's
    parameters are trainable. A module already wrapped gets one more adapter.

    Args:
        model: any nn.Module.
        cfg: which modules, rank, alpha, dropout, initialisation.
        adapter_name: the name to store the adapter under.
        activate: make this adapter the only active one (default), as PEFT's get_peft_model does.

    Returns:
        The same model object.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}; "
                           "delete_adapter it first or pick another name")
    targets = plan_injection(model, cfg)
    _check_variant_targets(targets, cfg)
    _check_token_targets(model, targets, cfg)
    _warn_tied_embeddings(model, targets)
    if any(t.kind == "conv1d" for t in targets) and not cfg.fan_in_fan_out:
        warnings.warn("targets include Conv1D layers (weights stored (in, out)); setting fan_in_fan_out=True "
                      "as PEFT does", stacklevel=2)
        cfg.fan_in_fan_out = True
    for p in model.parameters():
        p.requires_grad_(False)
    contiguous_head_input(model)  # a frozen bf16 head on CPU meets PyTorch #151934 without it
    modules = candidate_modules(model)
    for t in targets:
        layer = _wrap(model, t.name, modules[t.name], t.kind)
        spec = Adapter(t.r, t.lora_alpha, cfg.lora_dropout if t.kind != "embedding" else 0.0, cfg.use_rslora,
                       cfg.use_dora)
        layer.add_adapter(adapter_name, spec, cfg.init_lora_weights)
    if cfg.modules_to_save:
        add_modules_to_save(model, cfg.modules_to_save, adapter_name)
    if cfg.trainable_token_indices:
        add_trainable_tokens(model, cfg.trainable_token_indices, adapter_name)
    set_requires_grad(model, [adapter_name], True)
    set_bias_trainable(model, cfg.bias, True)
    model.lorakit_configs = {**getattr(model, "lorakit_configs", {}), adapter_name: cfg}
    if activate:
        set_active(model, [adapter_name])
    return model




def _check_token_targets(model: nn.Module, targets: list[Target], cfg: LoraConfig) -> None:
    """trainable_token_indices names embeddings (rows in range) that LoRA and modules_to_save leave alone."""
    if not cfg.trainable_token_indices:
        return
    for path in token_targets(model, cfg.trainable_token_indices, candidate_modules(model)):
        saved = any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in cfg.modules_to_save or [])
        if saved or path in {t.name for t in targets}:
            raise TargetError(f"{path!r} is targeted by LoRA or modules_to_save and by trainable_token_indices; train "
                              "its rows with trainable_token_indices or the whole table, not both")


def _warn_tied_embeddings(model: nn.Module, targets: list[Target]) -> None:
    """A LoRA on an embedding whose table another module shares acts on the input side only; merge refuses it."""
    for t in (t for t in targets if t.kind == "embedding"):
        table = model.get_submodule(t.name).weight
        others = [n for n, p in model.named_parameters(remove_duplicate=False)
                  if p is table and not n.startswith(t.name + ".")]
        if others:
            warnings.warn(f"LoRA on {t.name}: its table is tied to {', '.join(others)}, which the adapter does not "
                          "change while training, and merging it is refused (it would change both). To keep the tie, "
                          "train new rows with trainable_token_indices or leave the embedding out of target_modules; "
                          "to adapt the input side alone, untie the weights before injecting", stacklevel=3)


def _check_variant_targets(targets: list[Target], cfg: LoraConfig) -> None:
    """PiSSA/OLoRA are for Linear layers (as in PEFT): say so before anything is wrapped."""
    embeddings = [t.name for t in targets if t.kind == "embedding"]
    if embeddings and moves_base(cfg.init_lora_weights):
        raise TargetError(f"init_lora_weights={cfg.init_lora_weights!r} applies to Linear layers only, but "
                          f"target_modules matches the embedding(s) {', '.join(embeddings)}; exclude them "
                          "(exclude_modules) or use another initialisation")


def contiguous_head_input(model: nn.Module) -> None:
    """Make the output head's input contiguous before it runs (a no-op copy when it already is).

    transformers slices the last hidden state for ``logits_to_keep`` (generation's prefill asks for
    the last position only); on CPU a non-contiguous bf16/fp16 input to a Linear whose weight needs
    no gradient goes through a batched matmul that copies the whole weight once per row (PyTorch
    issue #151934): B × 56 MiB and seconds for SmolLM2's head at batch B. Idempotent.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_lorakit_contiguous", False):
        return
    head.register_forward_pre_hook(_contiguous_args)
    head._lorakit_contiguous = True


def _contiguous_args(module, args):
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
