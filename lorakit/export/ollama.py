"""An Ollama Modelfile for a GGUF model (and optionally a GGUF LoRA adapter on it).

``ollama create NAME -f DIR/Modelfile`` then builds the model. Ollama's templates are Go templates,
not Jinja: the chat formats lorakit recognises in the model's chat template (ChatML, Llama 3) get
their Go template and stop tokens written out; for any other, TEMPLATE is left out and Ollama picks
one from the GGUF's own ``tokenizer.chat_template``, as it does for any GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..fileio import atomic_write_text
from .gguf_format import GgufExportError, gguf_module

_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
           '{{ end }}<|im_start|>assistant\n')
_LLAMA3 = ('<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
           '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
# (marker in the Jinja chat template, Go template, stop strings)
_FORMATS = (("<|im_start|>", _CHATML, ["<|im_end|>"]),
            ("<|start_header_id|>", _LLAMA3, ["<|eot_id|>", "<|end_of_text|>"]))


def write_modelfile(folder: str | Path, model_gguf: str | Path, adapter_gguf: str | Path | None = None) -> Path:
    """Write ``folder/Modelfile``: FROM the model GGUF, ADAPTER the LoRA GGUF (if any), TEMPLATE, stops.

    Args:
        folder: output directory (created); the Modelfile is written atomically.
        model_gguf: a GGUF model file (a base, or a merged model).
        adapter_gguf: a GGUF LoRA adapter for that base, or None.

    Returns:
        The Modelfile's path.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GgufExportError(f"--ollama {folder}: exists and is not a directory")
    template, eos = _chat_template(Path(model_gguf))
    lines = ["# Made by lorakit export. Build it with:", f"#   ollama create NAME -f {folder / 'Modelfile'}",
             f"FROM {_relative(model_gguf, folder)}"]
    if adapter_gguf is not None:
        lines.append(f"ADAPTER {_relative(adapter_gguf, folder)}")
    go, stops = _go_template(template)
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines.append("# TEMPLATE: not a chat format lorakit knows; Ollama takes it from the GGUF's chat template")
    for stop in dict.fromkeys(stops + ([eos] if eos else [])):
        lines.append(f'PARAMETER stop "{_quote(stop)}"')
    path = folder / "Modelfile"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _go_template(template: str | None) -> tuple[str | None, list[str]]:
    for marker, go, stops in _FORMATS:
        if template and marker in template:
            return go, list(stops)
    return None, []


def _chat_template(model_gguf: Path) -> tuple[str | None, str | None]:
    """(tokenizer.chat_template, eos token text) from a GGUF's metadata."""
    if not model_gguf.is_file():
        raise GgufExportError(f"{model_gguf}: no such GGUF file for the Modelfile's FROM")
    reader = gguf_module().GGUFReader(model_gguf)
    field = reader.fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    eos_field, tokens = reader.fields.get("tokenizer.ggml.eos_token_id"), reader.fields.get("tokenizer.ggml.tokens")
    eos = tokens.contents(int(eos_field.contents())) if eos_field is not None and tokens is not None else None
    return template, eos


def _relative(path: str | Path, folder: Path) -> str:
    """``path`` relative to the Modelfile's folder when inside it (Ollama resolves it there), else absolute."""
    path = Path(path).resolve()
    try:
        return f"./{path.relative_to(folder.resolve()).as_posix()}"  # "./": a path, not a model name
    except ValueError:
        return os.fspath(path)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
