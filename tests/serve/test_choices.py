"""The OpenAI ``n`` parameter through the generation core: a request's n choices are admitted side by side
and prefill their prompt once; greedy choices are equal, seeded ones equal generate()'s, streams carry
every index; checked with the official openai client against uvicorn."""

import socket
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.generate import SamplingParams, generate
from lorakit.serve.app import create_app
from lorakit.serve.engine import Limits, engine_from_spec

PROMPT = "hello there, my friend"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """uvicorn on a free port in a thread, serving the tiny model and one adapter; shut down after."""
    import uvicorn

    folder = tmp_path_factory.mktemp("adapters")
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(400)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "alpha")
    lk.save_adapter(model, folder / "alpha", "alpha")
    engine = engine_from_spec(str(tiny_model_dir), {"alpha": folder / "alpha"}, name="tiny",
                              limits=Limits(max_prompt_tokens=64, max_tokens=24))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start within 5 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    server.should_exit = True
    thread.join(10)
    sock.close()


def _core(engine, prompt_ids, n, sampling):
    with engine._model_lock:  # the server's worker is idle between requests; the core runs on the same model
        return generate(engine.model, engine.tokenizer, [prompt_ids], n=n, sampling=sampling, adapters=["alpha"])[0]


def test_n_choices_for_completions_and_chat_with_the_openai_client(server):
    import httpx
    import openai

    url, engine = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    ids = engine.encode(PROMPT)
    shared_before = httpx.get(f"{url}/health").json()["shared_prefix_tokens"]

    greedy = client.completions.create(model="alpha", prompt=PROMPT, n=3, max_tokens=8, temperature=0)
    want = _core(engine, ids, 1, SamplingParams(max_tokens=8, temperature=0))[0]
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.text for c in greedy.choices] == [want.text] * 3
    assert greedy.usage.completion_tokens == 3 * len(want.token_ids)
    health = httpx.get(f"{url}/health").json()
    assert health["shared_prefix_tokens"] - shared_before == 2 * (len(ids) - 1)  # the prompt prefilled once

    sampled = client.completions.create(model="alpha", prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=11)
    core = _core(engine, ids, 3, SamplingParams(max_tokens=8, temperature=1.0, seed=11))
    assert [c.text for c in sampled.choices] == [c.text for c in core]
    assert len({c.text for c in sampled.choices}) > 1

    chunks = client.completions.create(model="alpha", prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=11,
                                       stream=True)
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in core]

    chat = dict(model="alpha", messages=[{"role": "user", "content": "say something nice"}], max_tokens=6,
                temperature=1.0, seed=3, n=3)
    answer = client.chat.completions.create(**chat)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    pieces = ["", "", ""]
    for chunk in client.chat.completions.create(**chat, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == [c.message.content for c in answer.choices]
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="alpha", prompt=PROMPT, n=9, max_tokens=2)


def test_queued_choices_count_as_rows(tiny_model_dir):
    """Before the worker runs, a request's n choices wait as one queue item but count as n rows."""
    engine = engine_from_spec(str(tiny_model_dir), name="tiny", limits=Limits(max_prompt_tokens=64, max_tokens=8))
    rows = engine.submit_choices(engine.encode(PROMPT), "tiny", [SamplingParams(max_tokens=2)] * 3, lambda e: None)
    engine.submit(engine.encode("x"), "tiny", SamplingParams(max_tokens=2), lambda e: None)
    assert [r.index for r in rows] == [0, 1, 2] and engine.waiting() == 4 and engine.stats.requests == 4
    engine.close()  # queued rows end with the shutdown error
    assert all(r.finish_reason == "error" for r in rows) and engine.waiting() == 0
