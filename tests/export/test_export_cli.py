"""`lorakit export` and the Ollama Modelfile; `lorakit merge --dtype bf16`."""

from __future__ import annotations

import gguf
from safetensors import safe_open

from lorakit.cli.main import main


def test_export_adapter_with_modelfile(patterned, base_gguf, tmp_path, capsys):
    _, adapter = patterned
    folder = tmp_path / "ollama"
    rc = main(["export", str(adapter), "--base", str(base_gguf), "--gguf", str(folder / "a.gguf"),
               "--ollama", str(folder)])
    assert rc == 0, capsys.readouterr().err
    assert gguf.GGUFReader(folder / "a.gguf").fields["general.type"].contents() == "adapter"
    lines = (folder / "Modelfile").read_text().splitlines()
    assert f"FROM {base_gguf.resolve()}" in lines and "ADAPTER ./a.gguf" in lines
    text = "\n".join(lines)
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text  # the base's ChatML template
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "ollama create NAME -f" in capsys.readouterr().out


def test_export_merged_into_ollama_folder(patterned, bpe_dir, tmp_path, capsys):
    """A transformers base has no GGUF for FROM: --ollama alone writes the merged model into the folder."""
    _, adapter = patterned
    folder = tmp_path / "o"
    assert main(["export", str(adapter), "--base", str(bpe_dir), "--ollama", str(folder), "--outtype", "f16"]) == 0
    assert "FROM ./model.gguf" in (folder / "Modelfile").read_text()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(folder / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "merged llama model" in capsys.readouterr().out


def test_export_errors(patterned, bpe_dir, tmp_path, capsys):
    _, adapter = patterned
    assert main(["export", str(adapter)]) == 2
    assert "--gguf OUT.gguf" in capsys.readouterr().err
    assert main(["export", str(adapter), "--base", str(bpe_dir), "--gguf", str(tmp_path / "a.gguf"),
                 "--ollama", str(tmp_path / "o")]) == 2
    assert "needs a GGUF base" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()  # refused before anything was written


def test_merge_dtype_short_names(tiny_model_dir, tmp_path):
    import torch

    from lorakit import LoraConfig, inject, save_adapter
    from lorakit.models.load import load_model

    model, _ = load_model(str(tiny_model_dir))
    inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                 str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} and torch is not None


def test_embedded_model_is_a_gguf_base_by_every_name(bpe_dir):
    """Adapters trained on the embedded model record its hub id; that names the embedded GGUF here too."""
    import pytest

    from lorakit.export.gguf_merged import gguf_source
    from lorakit.models.load import EMBEDDED_HUB_ID, resolve_embedded_gguf

    try:
        embedded = resolve_embedded_gguf()
    except Exception:
        pytest.skip("the embedded model's package is not installed")
    assert gguf_source(EMBEDDED_HUB_ID) == gguf_source("default") == embedded
    assert gguf_source(str(bpe_dir)) is None
