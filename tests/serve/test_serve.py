"""The serving engine (batched == single, sampling, stops, LRU) and its HTTP API (TestClient, real openai client)."""

import json
import queue
import socket
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.generate import Row, SamplingParams
from lorakit.generate.stops import held_back as _held_back
from lorakit.serve.app import create_app, resolve_adapter_path
from lorakit.serve.engine import (
    ConflictError,
    Engine,
    ForbiddenError,
    Limits,
    NotFoundError,
    ServeError,
    engine_from_spec,
)

LIMITS = dict(max_prompt_tokens=64, max_tokens=24, max_adapters=4, batch_window_ms=40)
ADAPTERS = {"alpha": (2, "all-linear"), "beta": (4, ["q_proj", "v_proj", "embed_tokens"]), "gamma": (3, ["o_proj"])}



@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """--adapter-root holding three random adapters of the tiny model (different ranks and targets)."""
    folder = tmp_path_factory.mktemp("adapters")
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(100 + i)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False), name)
        lk.save_adapter(model, folder / name, name)
    return folder


def _engine(model_dir, root, **limits) -> Engine:
    return engine_from_spec(str(model_dir), {"alpha": root / "alpha", "beta": root / "beta"}, name="tiny",
                            limits=Limits(**{**LIMITS, **limits}))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, root):
    with _engine(tiny_model_dir, root) as eng:
        yield eng


@pytest.fixture(scope="module")
def client(engine, root):
    from fastapi.testclient import TestClient

    return TestClient(create_app(engine, root))


def _greedy(engine, prompt, model, max_tokens=12, **kw):
    return engine.generate(prompt, model, max_tokens=max_tokens, temperature=0, **kw)


JOBS = [("hello", "alpha", 12), ("the quick brown", "beta", 7), ("x", "tiny", 12), ("hello world again", "alpha", 9),
        ("zebra", "beta", 12)]


# ---- engine ----------------------------------------------------------------------------------------

def test_engine_batches_across_adapters_and_batched_equals_single(engine):
    single = [_greedy(engine, p, m, n).text for p, m, n in JOBS]
    assert len({single[0], _greedy(engine, "hello", "tiny").text, _greedy(engine, "hello", "beta").text}) == 3
    engine.close()  # queue every request before the worker runs: one batch, whatever the machine's load
    sinks = [queue.Queue() for _ in JOBS]
    for (p, m, n), sink in zip(JOBS, sinks, strict=True):
        engine.submit(engine.encode(p), m, SamplingParams(max_tokens=n, temperature=0), sink.put)
    before = engine.stats.batches
    engine.start()
    batched = []
    for sink in sinks:
        parts = [sink.get(timeout=30)]
        while parts[-1].finish_reason is None:
            parts.append(sink.get(timeout=30))
        batched.append("".join(e.text for e in parts))
    assert batched == single
    assert engine.stats.batches == before + 1 and engine.stats.largest_batch >= len(JOBS)


def test_sampling_seed_top_p_stop_and_length(engine):
    sampled = [engine.generate("abc", "alpha", max_tokens=12, temperature=1.5, seed=s).text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    nucleus = engine.generate("abc", "alpha", max_tokens=12, temperature=1.5, top_p=1e-6, seed=3)
    full = _greedy(engine, "abc", "alpha")
    assert nucleus.text == full.text  # a tiny top_p keeps only the most likely token: greedy
    assert full.finish_reason == "length" and full.completion_tokens == 12
    stop = full.text[4:6]
    cut = _greedy(engine, "abc", "alpha", stop=[stop, "never"])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"


def test_stream_holds_back_possible_stop_starts():
    assert _held_back("abc<|e", ["<|end|>"]) == 3
    assert _held_back("abc", ["<|end|>"]) == 0
    assert _held_back("ab\ufffd", []) == 1
    events = []

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("ab<|x"[i] for i in ids)

    row = Row([0], None, SamplingParams(max_tokens=9, stop=("<|x",)), events.append)
    for token in (0, 1, 2, 3):  # "a", "b", "<", "|": the last two may start the stop string
        row.push(token, Tok(), eos_ids=set())
    assert "".join(e.text for e in events) == "ab"
    row.push(4, Tok(), eos_ids=set())
    assert row.finish_reason == "stop" and "".join(e.text for e in events) == "ab"


def test_lru_eviction_skips_busy_adapters(tiny_model_dir, root, tmp_path):
    eng = _engine(tiny_model_dir, root, max_adapters=2)  # not started: submitted requests stay queued
    with pytest.raises(lk.AdapterFormatError):
        eng.load_adapter("broken", tmp_path)  # an adapter that fails to load evicts nothing
    assert list(eng.adapters()) == ["alpha", "beta"]
    sink = queue.Queue()
    eng.submit(eng.encode("hi"), "alpha", SamplingParams(), sink.put)  # alpha busy and most recently used
    eng.load_adapter("gamma", root / "gamma")  # evicts beta, the least recently used idle adapter
    assert list(eng.adapters()) == ["alpha", "gamma"]
    eng.load_adapter("delta", root / "gamma")  # evicts gamma; alpha is busy
    eng.submit(eng.encode("hi"), "delta", SamplingParams(), sink.put)
    with pytest.raises(ConflictError, match="all 2 adapter slots are in use"):
        eng.load_adapter("epsilon", root / "gamma")
    with pytest.raises(ConflictError, match="used by 1 request"):
        eng.unload_adapter("delta")
    eng.close()  # queued requests end with an error and release their adapters
    assert sink.get(timeout=5).finish_reason == "error"
    eng.unload_adapter("delta")
    assert lk.list_adapters(eng.model) == ["alpha"]


def test_a_finished_request_unpins_its_adapter_before_its_answer_arrives(tiny_model_dir, root):
    """A short request batched with a long one: when its last event arrives its adapter is free, so a
    DELETE right after the answer succeeds (it waits for the running batch, never answers 409)."""
    eng = _engine(tiny_model_dir, root)
    pending_at_answer = []

    def short_sink(event):
        if event.finish_reason is not None:
            pending_at_answer.append(eng._slots["beta"].pending)
            done.put(event)

    done, long_events = queue.Queue(), queue.Queue()
    # greedy: a sampled eos at the first step would end the long request with the short one (1 run in ~50)
    eng.submit(eng.encode("hi"), "alpha", SamplingParams(max_tokens=24, temperature=0), long_events.put)
    eng.submit(eng.encode("hi"), "beta", SamplingParams(max_tokens=1), short_sink)
    with eng:  # started after both are queued: they run in one batch
        assert done.get(timeout=60).finish_reason == "length"
        assert pending_at_answer == [0] and eng._slots["alpha"].pending == 1
        eng.unload_adapter("beta")
        assert "beta" not in eng.adapters()
        while long_events.get(timeout=60).finish_reason is None:
            pass
    assert eng._slots["alpha"].pending == 0  # released once, not twice (batch end is idempotent)


def test_adapter_paths_must_stay_inside_the_root(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "sneaky").mkdir()
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "w.safetensors")
    real = root.resolve()
    assert resolve_adapter_path(real, "alpha") == real / "alpha"
    assert resolve_adapter_path(real, str(real / "beta")) == real / "beta"
    for bad in ("../outside", "alpha/../../outside", str(outside), "link-out", "sneaky"):
        with pytest.raises(ForbiddenError):
            resolve_adapter_path(real, bad)
    with pytest.raises(ForbiddenError, match="without --adapter-root"):
        resolve_adapter_path(None, "alpha")
    with pytest.raises(NotFoundError):
        resolve_adapter_path(real, "missing")


# ---- HTTP through FastAPI's TestClient -----------------------------------------------------------------

def _sse_chunks(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_http_completions_chat_and_streams(client, engine):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]][:3] == ["tiny", "alpha", "beta"]
    assert client.get("/health").json()["status"] == "ok"
    want = _greedy(engine, "hello", "alpha", 10)
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 10, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == want.text
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    stream = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _sse_chunks(stream.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want.text
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    two = client.post("/v1/completions", json={**body, "prompt": ["hello", "x"], "n": 2}).json()
    assert [c["text"] for c in two["choices"]][:2] == [want.text, want.text] and len(two["choices"]) == 4

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    prompt = engine.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hi"}],
                                                  tokenize=False, add_generation_prompt=True)
    want = _greedy(engine, prompt, "beta", 8)
    body = {"model": "beta", "messages": messages, "max_tokens": 8, "temperature": 0}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    chunks = _sse_chunks(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_http_adapters_load_use_unload(client, engine):
    r = client.post("/v1/adapters", json={"name": "g", "path": "gamma"})
    assert r.status_code == 201 and r.json()["id"] == "g"
    assert "g" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    out = client.post("/v1/completions", json={"model": "g", "prompt": "hi", "max_tokens": 4, "temperature": 0})
    assert out.status_code == 200
    assert client.post("/v1/adapters", json={"name": "g", "path": "gamma"}).status_code == 409
    assert client.delete("/v1/adapters/g").json() == {"id": "g", "object": "model", "deleted": True}
    assert "g" not in lk.list_adapters(engine.model)
    assert client.delete("/v1/adapters/g").status_code == 404


def _refused(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert all(w in error["message"] for w in words), error["message"]
    return error


def test_http_refusals_are_openai_errors(client, root):
    ok = {"model": "alpha", "prompt": "hi", "max_tokens": 4}
    post = client.post
    _refused(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    _refused(post("/v1/completions", json={"model": "alpha"}), 400, "prompt")
    _refused(post("/v1/completions", json={**ok, "temperature": 9}), 400, "temperature")
    _refused(post("/v1/completions", json={**ok, "model": "nope"}), 404, "nope", "alpha", "beta")
    _refused(post("/v1/completions", json={**ok, "max_tokens": 10**9}), 400, "max_tokens", "24")
    _refused(post("/v1/completions", json={**ok, "prompt": "x" * 700}), 400, "700 tokens", "64")
    _refused(post("/v1/completions", json={**ok, "prompt": "x" * 5000}), 400, "5000 characters", "64")  # untokenized
    _refused(post("/v1/completions", json={**ok, "logprobs": 3}), 400, "logprobs")
    _refused(post("/v1/chat/completions", json={"model": "alpha", "messages": []}), 400, "messages")
    _refused(post("/v1/adapters", json={"name": "t", "path": "../etc"}), 403, "..")
    _refused(post("/v1/adapters", json={"name": "t", "path": "/etc"}), 403, "outside")
    _refused(post("/v1/adapters", json={"name": "t", "path": "missing"}), 404, "missing")
    (root / "empty").mkdir(exist_ok=True)
    _refused(post("/v1/adapters", json={"name": "t", "path": "empty"}), 400, "adapter_model.safetensors")
    _refused(post("/v1/adapters", json={"name": "a.b", "path": "gamma"}), 400, "a.b")
    _refused(client.delete("/v1/adapters/tiny"), 400, "base model")
    _refused(client.get("/v1/nothing"), 404)
    assert post("/v1/completions", json=ok).status_code == 200  # still serving


# ---- a real server and the official openai client ---------------------------------------------------

@pytest.fixture
def server_url(tiny_model_dir, root):
    """uvicorn on 127.0.0.1 (a free port, bound first) in a thread, with its own engine; shut down after."""
    import uvicorn

    engine = _engine(tiny_model_dir, root, batch_window_ms=60)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, root), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start within 5 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", engine
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


def test_openai_client_against_uvicorn(server_url):
    import openai

    url, engine = server_url
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny", "alpha", "beta"]
    jobs = [("hello", "alpha"), ("hello", "beta"), ("hello", "tiny"), ("quick", "alpha")]
    single = [client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for p, m in jobs]
    assert [c.choices[0].text for c in single] == [_greedy(engine, p, m, 8).text for p, m in jobs]
    results = [None] * len(jobs)

    def ask(i):
        p, m = jobs[i]
        results[i] = client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [c.choices[0].text for c in single]  # concurrent (batched) == one at a time
    streamed = client.completions.create(model="alpha", prompt="hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == single[0].choices[0].text

    chat = dict(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    answer = client.chat.completions.create(**chat)
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)]
    assert "".join(pieces) == answer.choices[0].message.content

    card = client.post("/adapters", body={"name": "gamma", "path": "gamma"}, cast_to=object)
    assert card["id"] == "gamma" and "gamma" in [m.id for m in client.models.list()]
    assert client.completions.create(model="gamma", prompt="hi", max_tokens=3, temperature=0).choices[0].text
    assert client.delete("/adapters/gamma", cast_to=object)["deleted"] is True

    with pytest.raises(openai.BadRequestError, match="JSON"):
        client.post("/completions", content=b"{oops", cast_to=object,
                    options={"headers": {"Content-Type": "application/json"}})
    with pytest.raises(openai.NotFoundError, match="no-such-adapter"):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=3)
    assert client.completions.create(model="gamma", prompt="hi", max_tokens=3).choices  # loaded on first use
    with pytest.raises(openai.PermissionDeniedError, match="outside"):
        client.post("/adapters", body={"name": "x", "path": "/tmp"}, cast_to=object)
    with pytest.raises(openai.PermissionDeniedError, match=r"\.\."):
        client.post("/adapters", body={"name": "x", "path": "../alpha"}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "y" * 10_000}])
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_cli_serve_wires_flags_into_the_app(tiny_model_dir, root, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from lorakit.cli.main import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    argv = ["serve", "--model", str(tiny_model_dir), "--adapter", f"a={root / 'alpha'}", "--adapter-root", str(root),
            "--port", "9", "--served-model-name", "base", "--max-tokens", "5", "--max-adapters", "1"]
    assert main(argv) == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 9
    with TestClient(seen["app"]) as http:  # the lifespan stops the engine on exit
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "a"]
        _refused(http.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 6}), 400, "1 to 5")
        assert http.post("/v1/adapters", json={"name": "b", "path": "beta"}).status_code == 201  # evicts a
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "b"]
    assert main(argv + ["--admission", "fcfs"]) == 0
    with TestClient(seen["app"]) as http:
        health = http.get("/health").json()
        assert (health["scheduler"], health["admission"]) == ("continuous", "fcfs")
    assert main(argv + ["--scheduler", "window", "--max-request-bytes", "300"]) == 0
    with TestClient(seen["app"]) as http:
        assert http.get("/health").json()["scheduler"] == "window"
        _refused(http.post("/v1/completions", json={"model": "a", "prompt": "x" * 300}), 413, "300 bytes")
        assert http.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert main(["serve", "--model", str(tiny_model_dir), "--adapter", "no-equals-sign"]) == 2


@pytest.mark.parametrize("kw, words", [(dict(use_dora=True), "DoRA"), (dict(init_lora_weights="pissa"), "convert_to_lora"),
                                       (dict(bias="all"), "biases")], ids=str)
def test_variants_a_shared_base_cannot_run_are_refused_before_loading(engine, tiny_model_dir, tmp_path, kw, words):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], **kw))
    lk.save_adapter(model, tmp_path / "variant")
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with pytest.raises(ServeError, match=words):
        engine.load_adapter("variant", tmp_path / "variant")
    after = engine.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
