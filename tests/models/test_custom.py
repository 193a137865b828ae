"""load_custom: MODULE:FUNCTION and file.py:FUNCTION specs, their errors, and --weights (safetensors or a
weights-only torch checkpoint, wrappers unwrapped, keys strictly matched), kept through LoRA injection."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.errors import ModelLoadError
from lorakit.models.custom import is_custom_spec, load_custom, read_state_dict

ROOT = Path(__file__).resolve().parents[2]
COSY = f"{ROOT}/examples/cosyvoice_lm.py"

MODULE_SOURCE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(self.proj(self.emb(ids)))

def build():
    torch.manual_seed(0)
    return Net()

def build_pair():
    return Net(), "a tokenizer"

def not_a_model():
    return 42

def broken():
    raise RuntimeError("no GPU here")

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "usernet.py"
    sys.modules.pop("usernet", None)


def test_is_custom_spec_tells_builders_from_other_specs(tmp_path):
    assert is_custom_spec("examples/cosyvoice_lm.py:build_tiny")
    assert is_custom_spec("mypkg.tts:build") and is_custom_spec("usernet:build")
    for other in ("smollm2-135m-instruct", "default", "HuggingFaceTB/SmolLM2-135M-Instruct", "model.gguf",
                  str(tmp_path), "org/name", "file.py:", ":build", "a b:build", "x.py:1build", None):
        assert not is_custom_spec(other), other


def test_module_spec_and_pair_and_file_spec(user_module):
    model, tok = load_custom("usernet:build")
    assert type(model).__name__ == "Net" and tok is None
    assert model.name_or_path == "usernet:build"
    model, tok = load_custom("usernet:build_pair")
    assert tok == "a tokenizer"
    model, _ = load_custom(f"{user_module}:build")
    assert model.name_or_path == f"{user_module.resolve()}:build"


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:build", ["no module named 'no_such_module_xyz'", "file.py:FUNCTION"]),
    ("usernet:nope", ["has no function 'nope'", "build", "build_pair"]),
    ("usernet:NOT_CALLABLE", ["non-callable 'NOT_CALLABLE'"]),
    ("usernet:not_a_model", ["returned int", "nn.Module"]),
    ("usernet:broken", ["RuntimeError", "no GPU here"]),
    ("missing/file.py:build", ["missing/file.py: no such file"]),
    ("org/name", ["not a custom model spec"]),
])
def test_bad_specs_are_named(user_module, spec, words):
    with pytest.raises(ModelLoadError) as err:
        load_custom(spec)
    for w in words:
        assert w in str(err.value)


def test_a_missing_dependency_is_named(tmp_path, monkeypatch):
    (tmp_path / "needsdep.py").write_text("import not_installed_pkg_q\n\ndef build():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="needs 'not_installed_pkg_q'"):
        load_custom("needsdep:build")


def _trained(seed=7):
    from usernet import Net

    torch.manual_seed(seed)
    return Net()


def test_safetensors_weights_load_and_tied_key_may_be_absent(user_module, tmp_path):
    src = _trained()
    state = {k: v for k, v in src.state_dict().items() if k != "head.weight"}  # saved once, as HF does
    save_file(state, tmp_path / "w.safetensors")
    model, _ = load_custom("usernet:build", weights=tmp_path / "w.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids), src(ids))
    assert model.head.weight is model.emb.weight


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "optimizer_states": []},
    lambda sd: {"model": sd, "step": 10},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"module": {f"module.model.{k}": v for k, v in sd.items()}},
])
def test_torch_checkpoint_wrappers_are_unwrapped(user_module, tmp_path, wrap):
    src = _trained()
    torch.save(wrap(src.state_dict()), tmp_path / "ckpt.pt")
    model, _ = load_custom("usernet:build", weights=tmp_path / "ckpt.pt")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_missing_unexpected_and_wrong_shape_keys_are_named(user_module, tmp_path):
    sd = {k: v for k, v in _trained().state_dict().items() if k != "head.weight"}
    save_file({k: v for k, v in sd.items() if k != "proj.bias"}, tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing from the file: proj\.bias.*--allow-missing-keys"):
        load_custom("usernet:build", weights=tmp_path / "missing.safetensors")
    model, _ = load_custom("usernet:build", weights=tmp_path / "missing.safetensors", allow_missing=True)
    torch.testing.assert_close(model.proj.weight, sd["proj.weight"])
    save_file({**sd, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\) the model does not have: extra\.weight"):
        load_custom("usernet:build", weights=tmp_path / "extra.safetensors", allow_missing=True)
    save_file({**sd, "proj.bias": torch.zeros(5)}, tmp_path / "shape.safetensors")
    with pytest.raises(ModelLoadError, match=r"proj\.bias \(5,\) \(model: \(6,\)\)"):
        load_custom("usernet:build", weights=tmp_path / "shape.safetensors")


class _RunsCode:
    """Unpickling this opens (creates) the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_runs_none(user_module, tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"state_dict": _trained().state_dict(), "hook": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelLoadError, match="refused.*Nothing in it was run"):
        load_custom("usernet:build", weights=tmp_path / "evil.ckpt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the file really would have run code
    assert marker.exists()


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such weights file"):
        read_state_dict(tmp_path / "none.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "other": 1}, tmp_path / "opt.pt")
    with pytest.raises(ModelLoadError, match="no state_dict / model / module"):
        read_state_dict(tmp_path / "opt.pt")


def test_pretrained_weights_survive_injection_into_a_custom_module(tmp_path):
    trained, _ = load_custom(f"{COSY}:build_tiny")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights a fresh build does not have
    save_file({k: v.contiguous() for k, v in trained.state_dict().items() if k != "llm.model.lm_head.weight"},
              tmp_path / "llm.safetensors")
    model, _ = load_custom(f"{COSY}:build_tiny", weights=tmp_path / "llm.safetensors")
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "speech_embedding"],
                             modules_to_save=["llm_decoder"]))
    base = model.llm.model.model
    torch.testing.assert_close(base.layers[0].self_attn.q_proj.base_layer.weight,
                               trained.llm.model.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(model.speech_embedding.base_layer.weight, trained.speech_embedding.weight)
    torch.testing.assert_close(model.llm_decoder.modules_to_save["default"].weight, trained.llm_decoder.weight)
    text, speech = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(text, speech), trained(text, speech))  # B = 0: the pretrained output
    assert isinstance(model.llm_decoder.original_module, nn.Linear)


def test_weights_into_a_meta_model_are_refused(tmp_path):
    spec = f"{COSY}:build_full"  # shapes only, on the meta device
    save_file({"x": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="meta device"):
        load_custom(spec, weights=tmp_path / "w.safetensors")
