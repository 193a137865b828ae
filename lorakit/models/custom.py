"""Your own model: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` builds an ``nn.Module`` (or a
``(module, tokenizer)`` pair), and ``--weights FILE`` loads its pretrained state dict into it.

Weights come from safetensors, or from a torch checkpoint (``.pt``/``.pth``/``.ckpt``/``.bin``) read by
torch's weights-only loader: a file whose pickle would import or run anything is refused and nothing
in it runs. The usual wrappers are unwrapped (a ``state_dict`` / ``model`` / ``module`` entry, e.g. a
Lightning checkpoint; ``model.`` / ``module.`` key prefixes), and every key must then match: a missing
or unexpected key, or a shape that does not fit, is an error naming it. The weights load before any
LoRA is injected, so injection keeps them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

_SPEC = re.compile(r"^(?P<where>[^:]+):(?P<fn>[A-Za-z_]\w*)$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
PREFIXES = ("module.", "model.")
SPEC_FORMS = ("a custom model spec is MODULE:FUNCTION (an importable module, e.g. mypkg.tts:build) or "
              "path/to/file.py:FUNCTION; FUNCTION() returns an nn.Module or (module, tokenizer)")


def is_custom_spec(spec) -> bool:
    """Whether ``spec`` names a builder function (``MODULE:FUNCTION`` / ``file.py:FUNCTION``) rather than a
    model directory, a .gguf file, a hub id or the embedded model.

    Args:
        spec: a model spec string.
    """
    if not isinstance(spec, str):
        return False
    m = _SPEC.match(spec.strip())
    if not m:
        return False
    where = m.group("where")
    return where.endswith(".py") or bool(_DOTTED.match(where))


def load_custom(spec: str, weights: str | Path | None = None, allow_missing: bool = False):
    """Build a model from a builder function, and load its pretrained weights if given.

    Args:
        spec: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``; the function takes no arguments and
            returns an ``nn.Module`` or ``(module, tokenizer)``.
        weights: a state-dict file (.safetensors, or a torch checkpoint read weights-only); None keeps
            the weights the function built.
        allow_missing: accept keys the model has and the file lacks (they keep the built values);
            unexpected keys are always an error.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None unless the function returned one. A model with no
        ``name_or_path`` gets the spec (a file path made absolute), which a saved adapter records.

    Raises:
        ModelLoadError: a bad spec (module or file not found, no such function, not a module returned),
            an unreadable or unsafe weights file, or keys that do not match (named).
    """
    fn = resolve_builder(spec)
    try:
        out = fn()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{spec}: the builder raised {type(exc).__name__}: {exc}") from exc
    model, tokenizer = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}: returned {type(out).__name__}, not an nn.Module or (nn.Module, tokenizer); "
                             "make the function return the model")
    if weights is not None:
        load_weights(model, weights, allow_missing=allow_missing)
    if not getattr(model, "name_or_path", None):
        model.name_or_path = _canonical(spec)
    return model, tokenizer


def _canonical(spec: str) -> str:
    where, _, fn = spec.strip().rpartition(":")
    return f"{Path(where).resolve()}:{fn}" if where.endswith(".py") else spec.strip()


def resolve_builder(spec: str):
    """The function a spec names, imported; or a ModelLoadError saying what is wrong.

    Args:
        spec: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``.
    """
    if not is_custom_spec(spec):
        raise ModelLoadError(f"{spec!r} is not a custom model spec: {SPEC_FORMS}")
    where, _, name = spec.strip().rpartition(":")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        what = "has no function" if fn is None else "has a non-callable"
        raise ModelLoadError(f"{where} {what} {name!r}; functions defined there: {', '.join(found) or 'none'}")
    return fn


def _import_file(where: str):
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"{where}: no such file (from the spec {where}:FUNCTION); {SPEC_FORMS}")
    # one module per file, under a name that cannot shadow an installed package
    stem = re.sub(r"\W", "_", path.stem)
    name = f"lorakit_custom_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelLoadError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(where: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where != exc.name and not where.startswith(exc.name + "."):
            raise ModelLoadError(f"importing {where} failed: it needs {exc.name!r}, which is not installed") from exc
        raise ModelLoadError(f"no module named {where!r} (from the spec {where}:FUNCTION). Install it, run from "
                             "the folder that holds it, or name the file: path/to/file.py:FUNCTION") from None
    except Exception as exc:
        raise ModelLoadError(f"importing {where} raised {type(exc).__name__}: {exc}") from exc


# ---- weights ----------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch checkpoint (weights only), wrappers unwrapped.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a bad file
            raise ModelLoadError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: refused: the checkpoint holds more than tensors and containers and "
                             f"torch's weights-only loader will not run it ({first}). Nothing in it was run. "
                             "Where you trust the file, save just its state dict: "
                             "torch.save(model.state_dict(), 'weights.pt') or as .safetensors") from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a torch checkpoint or safetensors file ({type(exc).__name__}: "
                             f"{exc})") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``module`` entries to a flat {key: tensor}."""
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ModelLoadError(f"{path}: a dict with keys {sorted(map(str, obj))[:12]} and no "
                                 f"{' / '.join(WRAPPER_KEYS)} entry holding the tensors; save the model's "
                                 "state_dict() itself")
        obj = inner
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``model.`` from every key when that makes more of them the model's own."""
    best, hits = state, len(own & set(state))
    for first in PREFIXES:
        for second in ("", *PREFIXES):
            prefix = first + second
            if all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                n = len(own & set(stripped))
                if n > hits:
                    best, hits = stripped, n
    return best


def load_weights(model: nn.Module, weights: str | Path | dict[str, torch.Tensor],
                 allow_missing: bool = False) -> None:
    """Load a state dict (a file or a dict) into ``model`` strictly, naming what does not fit.

    A key the file lacks but whose parameter is tied to a key it has (an output head sharing the
    input embedding) is not missing.

    Args:
        model: the built model (before any LoRA injection).
        weights: a file :func:`read_state_dict` reads, or a state dict.
        allow_missing: accept keys the file lacks.
    """
    where = str(weights) if not isinstance(weights, dict) else "state dict"
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ModelLoadError(f"{where}: the builder made the model on the meta device ({meta[0]} has no storage), "
                             "so there is nothing to load the weights into; build it on a real device (meta "
                             "builders are for counting)")
    state = read_state_dict(weights) if not isinstance(weights, dict) else weights
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - _tied_covered(model, set(state)))
    if unexpected:
        raise ModelLoadError(f"{where}: {len(unexpected)} unexpected key(s) the model does not have: "
                             f"{_names(unexpected)}; the model's keys look like {_names(sorted(own), 3)}")
    if missing and not allow_missing:
        raise ModelLoadError(f"{where}: {len(missing)} key(s) of the model missing from the file: {_names(missing)}. "
                             "Pass --allow-missing-keys (allow_missing=True) to keep the built values for them")
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelLoadError(f"{where}: {len(wrong)} tensor(s) of the wrong shape: {_names(wrong)}")
    model.load_state_dict(state, strict=False)


def _tied_covered(model: nn.Module, present: set[str]) -> set[str]:
    """Keys whose tensor is shared with a key in ``present`` (tied weights are saved once by many tools)."""
    groups: dict[int, list[str]] = {}
    for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() if present & set(names) for n in names}


def _names(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
