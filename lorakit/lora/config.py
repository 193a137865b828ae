"""LoraConfig: PEFT's field names and semantics, checked on construction.

The same object reads and writes ``adapter_config.json`` in the format PEFT's
``PeftConfig.from_pretrained`` accepts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")

# PEFT writes these keys; at their default value they change nothing lorakit does.
_PEFT_INERT_KEYS = {
    "peft_type": "LORA", "auto_mapping": None, "revision": None, "inference_mode": None,
    "peft_version": None, "loftq_config": {}, "megatron_config": None, "megatron_core": "megatron.core",
    "lora_bias": False, "layer_replication": None, "target_parameters": None,
    "use_qalora": False, "qalora_group_size": 16, "eva_config": None,
    "corda_config": None, "arrow_config": None, "alora_invocation_tokens": None, "ensure_weight_tying": False,
    "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "velora_config": None,
    "use_bdlora": None, "runtime_config": None, "exclude_modules": None,
}
# Of those, the ones whose non-default value means a method lorakit does not implement.
_UNSUPPORTED_IF_SET = (
    "lora_bias", "layer_replication", "target_parameters",
    "use_qalora", "alora_invocation_tokens", "use_bdlora",
)


@dataclass
class LoraConfig:
    """A LoRA configuration with PEFT's field names and meaning.

    Args:
        r: rank of the update B·A (>= 1).
        lora_alpha: scaling numerator; the update is multiplied by lora_alpha / r
            (or lora_alpha / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability applied to the input of A (0 <= p < 1).
        target_modules: list of names (a module matches when its qualified name equals an
            entry or ends with "." + entry), a string (full regex match on the qualified
            name), or "all-linear" (every Linear except the output head).
        exclude_modules: same matching rules; these modules are never adapted.
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        init_lora_weights: True (A kaiming-uniform, B zeros), "gaussian" (A ~ N(0, 1/r),
            B zeros), False (both random: the adapter starts non-zero; for tests), "pissa"
            (A, B = the top-r singular part of W, which leaves W; "pissa_niter_K": the same by a
            randomized SVD with K subspace iterations) or "olora" (A, B from W's QR). The last
            two move part of W into the adapter: the base weight becomes the residual.
        use_dora: DoRA: a trainable magnitude m per output feature and W' = m·(W + s·BA)/‖W + s·BA‖
            (row norms, detached from the graph as the paper and PEFT do).
        bias: which biases train with the adapter and are saved in its file: "none", "all"
            (every bias of the model) or "lora_only" (the biases of the adapted modules).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new head).
        trainable_token_indices: rows of an embedding trained in full (new tokens): a list of ids for the
            input embedding, or {embedding name: ids} (PEFT's meaning; lorakit.lora.tokens).
        layers_to_transform: layer index or indices to adapt (list targets only).
        layers_pattern: name of the module list holding the layers (e.g. "layers", "h").
        rank_pattern: {regex: r} overriding r for modules whose name ends with a match.
        alpha_pattern: {regex: alpha} overriding lora_alpha likewise.
        fan_in_fan_out: the base weight is stored (in, out) as in GPT-2's Conv1D.
        base_model_name_or_path: recorded in adapter_config.json for PEFT and vLLM.
        task_type: PEFT task type recorded in adapter_config.json (e.g. "CAUSAL_LM").
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be a number with 0 <= p < 1, got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_CHOICES)} (PEFT's meaning), got {self.bias!r}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        check_init(self.init_lora_weights)
        self.target_modules = _names_or_regex("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _str_list("modules_to_save", self.modules_to_save)
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        self.layers_to_transform = _layers(self.layers_to_transform)
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = _str_list("layers_pattern", self.layers_pattern)
        self.rank_pattern = _patterns("rank_pattern", self.rank_pattern, _check_rank)
        self.alpha_pattern = _patterns("alpha_pattern", self.alpha_pattern, _check_alpha)
        for what in ("target_modules", "exclude_modules"):
            value = getattr(self, what)
            if isinstance(value, str) and value != ALL_LINEAR:
                _compile(what, value)

    # ---- adapter_config.json -------------------------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict written as adapter_config.json (PEFT's keys, peft_type LORA)."""
        out = dataclasses.asdict(self)
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        out.update(peft_type="LORA", inference_mode=True, revision=None, lora_bias=False)
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], *, source: str = "adapter_config.json") -> LoraConfig:
        """Build a LoraConfig from a PEFT adapter_config dict.

        Keys lorakit does not know are ignored with a warning; PEFT features lorakit does not
        implement (DoRA, LoRA bias, ...) are refused with a ConfigError.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; lorakit loads LoRA adapters only")
        for key in _UNSUPPORTED_IF_SET:
            if data.get(key) not in (None, False, {}, []):
                raise ConfigError(f"{source}: {key}={data[key]!r} is a PEFT feature lorakit does not support")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(_PEFT_INERT_KEYS))
        if unknown:
            warnings.warn(f"{source}: ignoring keys lorakit does not know: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrong-typed field that slipped past the checks
            raise ConfigError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n"

    # ---- per-module values ---------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """r for a module, after rank_pattern (PEFT's get_pattern_key semantics)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for a module, after alpha_pattern."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


def target_modules_from_flags(names: list[str]) -> list[str] | str:
    """``--target-modules`` values → LoraConfig.target_modules: one "all-linear" or one regex stays a
    string, anything else is a list of names (the same rule for every verb and recipe)."""
    if len(names) == 1 and (names[0].lower() == ALL_LINEAR or any(c in names[0] for c in "*+?[]()|^$\\")):
        return names[0]
    return list(names)


def token_indices_from_flags(values: list[str | int]) -> list[int] | dict[str, list[int]] | None:
    """``--trainable-token-indices`` values → LoraConfig.trainable_token_indices: token ids (``3 5 7``: rows of
    the input embedding) or ``EMBEDDING=ID,ID,...`` per embedding; an empty list is None."""
    if not values:
        return None
    try:
        if all(isinstance(v, int) or "=" not in str(v) for v in values):
            return [int(v) for v in values]
        pairs = [str(v).split("=", 1) for v in values]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return {name: [int(i) for i in ids.split(",")] for name, ids in pairs}
    except ValueError:
        raise ConfigError(f"trainable_token_indices: expected token ids (3 5 7) or EMBEDDING=ID,ID,... per "
                          f"embedding (embed_tokens=3,5), got {' '.join(map(str, values))!r}") from None


def check_init(init) -> None:
    """Raise ConfigError unless ``init`` is an init_lora_weights value lorakit implements."""
    if isinstance(init, bool) or init in ("gaussian", "pissa", "olora"):
        return
    if isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init):
        return
    raise ConfigError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer) "
                      f"or 'olora', got {init!r}")


def moves_base(init) -> bool:
    """Whether an initialisation moves part of W into the adapter (PiSSA, OLoRA): the base becomes a residual."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def scaling_of(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor on B·A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / (r**0.5) if use_rslora else lora_alpha / r


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _compile(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None


def _patterns(what: str, value: Any, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping {{regex: value}}, got {type(value).__name__} {value!r}")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{what} keys must be non-empty regex strings, got {key!r}")
        _compile(f"{what} key", key)
        check(f"{what}[{key!r}]", v)
    return dict(value)


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")


def _check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")


def _str_list(what: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a list of non-empty module names, got {value!r}")
    return list(value)


def _names_or_regex(what: str, value: Any, allow_none: bool = True) -> list[str] | str | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{what} is required: a list of module names, a regex, or 'all-linear'")
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{what} must not be empty")
        return ALL_LINEAR if value.lower() == ALL_LINEAR else value
    names = _str_list(what, value)
    if not names:
        raise ConfigError(f"{what} must not be an empty list")
    return names


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    def ids(v) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                and i >= 0 for i in v)
    if value is None:
        return None
    if ids(value):
        return list(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k and ids(v) for k, v in value.items()):
        return {k: list(v) for k, v in value.items()}
    raise ConfigError(f"trainable_token_indices must be a non-empty list of token ids >= 0, or {{embedding name: "
                      f"[ids]}}, got {value!r}")


def _layers(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ConfigError(f"layers_to_transform must be a layer index or a list of indices >= 0, got {value!r}")
    return list(items)
