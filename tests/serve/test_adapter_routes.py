"""Adapters the way other servers load them: vLLM's runtime routes (aliases of /v1/adapters)."""


import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.serve.app import create_app
from lorakit.serve.engine import Limits, engine_from_spec

LIMITS = dict(max_prompt_tokens=64, max_tokens=24, max_adapters=4, batch_window_ms=20)
ADAPTERS = {"alpha": (2, "all-linear"), "beta": (4, ["q_proj", "v_proj"]), "gamma": (3, ["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """--adapter-root: three random adapters of the tiny model, an empty directory, and a link out of the root."""
    folder = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(200 + i)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False), name)
        lk.save_adapter(model, folder / name, name)
    (folder / "empty").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (folder / "escape").symlink_to(outside, target_is_directory=True)
    return folder


def _engine(model_dir, root, adapters=("alpha",), **limits):
    return engine_from_spec(str(model_dir), {a: root / a for a in adapters}, name="tiny",
                            limits=Limits(**{**LIMITS, **limits}))


def _client(engine, root, **kw):
    from fastapi.testclient import TestClient

    return TestClient(create_app(engine, root, **kw))


def _reference(model_dir, root, adapter, prompt_ids, max_tokens):
    """Greedy text of transformers' own generate() with the adapter loaded by lorakit (no engine involved)."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    lk.load_adapter(model, root / adapter, adapter)
    tok = lk.testing.char_tokenizer()
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def _refused(response, status, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


# ---- vLLM's routes -----------------------------------------------------------------------------

def test_vllm_load_and_unload_routes_answer_as_vllm_does(tiny_model_dir, root):
    with _engine(tiny_model_dir, root) as engine, _client(engine, root) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "gamma"})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'g' added successfully.")
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "alpha", "g"]
        assert lk.list_adapters(engine.model) == ["alpha", "g"]
        body = {"model": "g", "prompt": "hi", "max_tokens": 6, "temperature": 0}
        answer = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert answer == _reference(tiny_model_dir, root, "gamma", engine.encode("hi"), 6)

        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "beta"}), 400,
                 "'g' has already been loaded")  # vLLM: 400 (lorakit's own POST /v1/adapters: 409)
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "beta", "load_inplace": True}),
                 400, "in place", "unload_lora_adapter")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../gamma"}), 403, "..")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}), 403, "outside")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "escape"}), 403, "outside")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "nothing"}), 404, "nothing")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "empty"}), 400,
                 "adapter_model.safetensors")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": "gamma"}), 400, "lora_name")

        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "g", "lora_int_id": 7})
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'g' removed successfully.")
        assert lk.list_adapters(engine.model) == ["alpha"]
        _refused(http.post("/v1/unload_lora_adapter", json={"lora_name": "g"}), 404, "'g'")
        _refused(http.post("/v1/unload_lora_adapter", json={"lora_name": "tiny"}), 400, "base model")
        _refused(http.post("/v1/unload_lora_adapter", json={}), 400, "lora_name")
        _refused(http.post("/v1/completions", json=body), 404, "'g'")
    with _engine(tiny_model_dir, root) as engine, _client(engine, None) as http:
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "gamma"}), 403,
                 "--adapter-root")
