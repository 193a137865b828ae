"""Adapters the way other servers load them: vLLM's runtime routes (aliases of /v1/adapters) and LoRAX's load on
first use (a request naming an adapter directory of --adapter-root loads it, once, within max_adapters)."""

import queue
import threading

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
import lorakit.serve.engine as engine_module
from bench.serve.load import serve
from lorakit.generate import SamplingParams
from lorakit.serve.app import create_app
from lorakit.serve.engine import ConflictError, Limits, NotFoundError, engine_from_spec

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
    with _engine(tiny_model_dir, root) as engine, _client(engine, root, load_on_first_use=False) as http:
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
        _refused(http.post("/v1/completions", json=body), 404, "'g'")  # first use is off in this app
    with _engine(tiny_model_dir, root) as engine, _client(engine, None) as http:
        _refused(http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "gamma"}), 403,
                 "--adapter-root")


# ---- load on first use -------------------------------------------------------------------------

def test_concurrent_first_requests_load_an_adapter_once(tiny_model_dir, root, monkeypatch):
    """Eight clients ask for gamma (not loaded) at the same moment, over real HTTP: one load, eight answers
    equal to transformers' generate() with the adapter."""
    loads, real_load = [], engine_module.load_adapter
    gate = threading.Event()

    def slow_counted_load(model, path, name, **kw):
        loads.append(name)
        gate.wait(2)  # hold the first load until every client has sent its request (or 2 s)
        return real_load(model, path, name, **kw)

    monkeypatch.setattr(engine_module, "load_adapter", slow_counted_load)
    engine = _engine(tiny_model_dir, root, adapters=())
    clients, barrier, answers = 8, threading.Barrier(8), [None] * 8
    body = {"model": "gamma", "prompt": "hello", "max_tokens": 8, "temperature": 0}

    def ask(i, url):
        barrier.wait(10)
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": i % 2 == 1}, timeout=60)
        answers[i] = (r.status_code, r.text)

    with serve(engine, root) as url:
        threads = [threading.Thread(target=ask, args=(i, url)) for i in range(clients)]
        for t in threads:
            t.start()
        opener = threading.Timer(0.5, gate.set)  # the requests are in flight by then
        opener.start()
        for t in threads:
            t.join(60)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny", "gamma"]
    engine.close()
    assert loads == ["gamma"]
    want = _reference(tiny_model_dir, root, "gamma", engine.encode("hello"), 8)
    for i, (status, text) in enumerate(answers):
        assert status == 200, text
        got = "".join(c["choices"][0]["text"] for c in _chunks(text)) if i % 2 else httpx.Response(
            200, text=text).json()["choices"][0]["text"]
        assert got == want
    assert engine._slots["gamma"].pending == 0  # every hold and every row released


def _chunks(text: str) -> list:
    import json

    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1] if json.loads(line)["choices"]]


def test_first_use_evicts_the_least_recently_used_idle_adapter(tiny_model_dir, root):
    with _engine(tiny_model_dir, root, adapters=("alpha", "beta"), max_adapters=2) as engine, \
            _client(engine, root) as http:
        body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
        assert http.post("/v1/completions", json={**body, "model": "alpha"}).status_code == 200  # beta is LRU now
        assert http.post("/v1/chat/completions", json={"model": "gamma", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert list(engine.adapters()) == ["alpha", "gamma"]
        assert lk.list_adapters(engine.model) == ["alpha", "gamma"]
        assert http.post("/v1/completions", json={**body, "model": "beta"}).status_code == 200  # evicts alpha
        assert list(engine.adapters()) == ["gamma", "beta"]
        _refused(http.post("/v1/completions", json={**body, "model": "empty"}), 400, "adapter_model.safetensors")
        _refused(http.post("/v1/completions", json={**body, "model": "escape"}), 403, "outside the adapter root")
        for name in ("nothing", "../alpha", "gamma/..", ".."):
            _refused(http.post("/v1/completions", json={**body, "model": name}), 404, "not found")
        assert list(engine.adapters()) == ["gamma", "beta"]  # refusals changed nothing


def test_hold_pins_the_adapter_and_refuses_when_every_slot_is_busy(tiny_model_dir, root):
    engine = _engine(tiny_model_dir, root, adapters=("alpha",), max_adapters=2)  # not started: rows stay queued
    locate = {"beta": root / "beta", "gamma": root / "gamma"}.get
    sink = queue.Queue()
    engine.submit(engine.encode("hi"), "alpha", SamplingParams(), sink.put)  # alpha busy
    release = engine.hold("beta", locate)  # loaded on first use, held by the caller
    assert list(engine.adapters()) == ["alpha", "beta"] and engine._slots["beta"].pending == 1
    with pytest.raises(ConflictError, match="all 2 adapter slots are in use"):
        engine.hold("gamma", locate)  # both slots busy: nothing to evict
    with pytest.raises(ConflictError, match="used by 1 request"):
        engine.unload_adapter("beta")
    release()
    release()  # idempotent: the count never goes below zero
    assert engine._slots["beta"].pending == 0
    engine.hold("gamma", locate)()  # beta is idle now: evicted
    assert list(engine.adapters()) == ["alpha", "gamma"]
    engine.hold("tiny", locate)()  # the base model: nothing to hold
    engine.hold("unknown", locate)()  # nothing to load: submit answers 404
    with pytest.raises(NotFoundError, match="unknown"):
        engine.submit(engine.encode("hi"), "unknown", SamplingParams(), sink.put)
    engine.close()
    assert sink.get(timeout=5).finish_reason == "error"


def test_cli_turns_load_on_first_use_off(tiny_model_dir, root, monkeypatch):
    import uvicorn

    from lorakit.cli.main import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    base = ["serve", "--model", str(tiny_model_dir), "--adapter-root", str(root)]
    assert main(base) == 0 and main([*base, "--no-load-on-first-use"]) == 0
    assert [a.state.load_on_first_use for a in apps] == [True, False]
    for app in apps:
        app.state.engine.close()
