"""lorakit.lora.card: the adapter's README.md, with PEFT's own card as the reference for its metadata."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from huggingface_hub import ModelCard

import lorakit as lk
from lorakit.lora.card import model_card, write_model_card

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _tiny(name_or_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path)


def test_front_matter_matches_peft_for_a_hub_base(tiny_model_dir, tmp_path):
    import peft

    ref = _tiny(tiny_model_dir)
    ref.name_or_path = ref.config._name_or_path = HUB_ID  # as if loaded from the hub
    peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "peft", save_embedding_layers=False)  # False: no hub lookup of the base
    model = _tiny(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                   base_model_name_or_path=HUB_ID))
    lk.save_adapter(model, tmp_path / "ours")
    theirs, ours = (ModelCard.load(tmp_path / d / "README.md").data for d in ("peft", "ours"))
    for key in ("base_model", "library_name", "pipeline_tag"):
        assert ours.get(key) == theirs.get(key), key
    assert set(theirs.tags) <= set(ours.tags) and "lorakit" in ours.tags
    text = (tmp_path / "ours" / "README.md").read_text()
    assert "- r: 4" in text and "- lora_alpha: 8 (scaling = lora_alpha / r)" in text
    assert f'PeftModel.from_pretrained(base, "{tmp_path / "ours"}")' in text
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["README.md", "adapter_config.json",
                                                                       "adapter_model.safetensors"]


def test_a_local_base_is_named_in_the_text_not_the_hub_metadata(tiny_model_dir, tmp_path):
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], use_rslora=True, base_model_name_or_path=str(tiny_model_dir))
    card = write_model_card(tmp_path, cfg)
    data = ModelCard.load(card).data
    assert data.get("base_model") is None and data.library_name == "peft"  # the Hub refuses a path there
    assert not any(t.startswith("base_model:") for t in data.tags)
    assert f"`{tiny_model_dir}` (a local path" in card.read_text() and "lora_alpha / sqrt(r)" in card.read_text()


def test_extra_sections_come_in_order_before_the_usage():
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=HUB_ID)
    text = model_card(cfg, {"Training data": ["- dates: 800 examples"], "Quantization": "NF4 base\nmore"})
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    assert heads == ["LoRA configuration", "Training data", "Quantization", "How to load it"]
    assert "- dates: 800 examples\n" in text and "NF4 base\nmore\n" in text


def test_the_cards_lorakit_snippet_runs(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                   base_model_name_or_path=str(tiny_model_dir)))
    lk.save_adapter(model, tmp_path / "ad")
    text = (tmp_path / "ad" / "README.md").read_text()
    snippet = re.search(r"```python\n(import lorakit.*?)```", text, flags=re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102  (our own card's code)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(scope["model"](ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_the_card_is_replaced_atomically(tmp_path, monkeypatch):
    import os

    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=HUB_ID)
    write_model_card(tmp_path, cfg)
    before = (tmp_path / "README.md").read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_model_card(tmp_path, lk.LoraConfig(r=8, target_modules=["v_proj"]))
    assert (tmp_path / "README.md").read_text() == before and os.listdir(tmp_path) == ["README.md"]


def test_a_readme_lorakit_did_not_write_is_kept_and_its_own_card_is_rewritten(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=HUB_ID))
    lk.save_adapter(model, tmp_path / "ours")
    lk.save_adapter(model, tmp_path / "ours")  # lorakit's own card: rewritten without a word
    card = tmp_path / "ours" / "README.md"
    card.write_text(card.read_text().replace("- r: 2", "- r: 3"))  # an edit that keeps lorakit's mark
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lk.save_adapter(model, tmp_path / "ours")
    assert "- r: 2" in card.read_text() and not [w for w in seen if "kept as it is" in str(w.message)]

    mine = "# My adapter\n\nNotes I wrote by hand.\n"
    card.write_text(mine)
    (tmp_path / "ours" / "adapter_model.safetensors").unlink()
    with pytest.warns(UserWarning, match="README.md: kept as it is"):
        lk.save_adapter(model, tmp_path / "ours")
    assert card.read_text() == mine and (tmp_path / "ours" / "adapter_model.safetensors").is_file()
