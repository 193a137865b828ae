"""The HTTP layer under hostile load: oversized bodies get 413 before parsing, huge prompts are refused
without tokenizing, other clients keep being answered; /metrics and /health; a client that disconnects
frees its row."""

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.serve.load import build_files, serve
from lorakit.serve.engine import Limits, engine_from_spec

LIMITS = dict(max_prompt_tokens=64, max_tokens=200, max_adapters=4, max_batch_size=4, max_request_bytes=64_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    model_dir, root, names = build_files(folder, 2)
    engine = engine_from_spec(str(model_dir), {n: root / n for n in names[:2]}, name="tiny", limits=Limits(**LIMITS))
    with serve(engine, root) as url:
        yield url, engine


def _complete(http, prompt="hello", model="a0", max_tokens=6, **kw):
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0, **kw})


def _metrics(http) -> dict:
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_oversized_bodies_get_413_and_other_clients_keep_being_answered(server):
    url, engine = server
    jobs = [("hello", "a0"), ("the quick", "a1"), ("x", "tiny"), ("zebra hum", "a0")]
    with httpx.Client(base_url=url, timeout=60) as http:
        refs = {job: _complete(http, *job).json()["choices"][0]["text"] for job in jobs}
    huge = b'{"model": "a0", "prompt": "' + b"x" * 1_000_000 + b'"}'
    hostile, answers, stop = [], [], threading.Event()

    def attack():
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                hostile.append(http.post("/v1/completions", content=huge,
                                         headers={"content-type": "application/json"}).status_code)
                chunked = http.post("/v1/completions", content=iter([huge[:40_000]] * 4),  # no Content-Length
                                    headers={"content-type": "application/json"})
                hostile.append(chunked.status_code)
                big_prompt = _complete(http, "y" * 60_000)  # fits the body limit; refused by characters
                hostile.append((big_prompt.status_code, "characters" in big_prompt.text))

    def work():
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(3):
                for job in jobs:
                    answers.append(_complete(http, *job).json()["choices"][0]["text"] == refs[job])

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    workers = [threading.Thread(target=work) for _ in range(2)]
    for t in attackers + workers:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    for t in attackers:
        t.join(120)
    assert answers == [True] * 24  # every honest request answered, with its single-request text
    assert hostile and set(hostile) == {413, (400, True)}, set(hostile)
    with httpx.Client(base_url=url, timeout=60) as http:
        error = http.post("/v1/completions", content=huge, headers={"content-type": "application/json"}).json()
        assert "64000 bytes" in error["error"]["message"] and "--max-request-bytes" in error["error"]["message"]
        chat = http.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "user",
                                                                                     "content": "z" * 50_000}]})
        assert chat.status_code == 400 and "characters" in chat.json()["error"]["message"]


def test_metrics_and_health_show_requests_rows_and_the_kv_cap(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=60) as http:
        before = _metrics(http)
        assert _complete(http, max_tokens=5).status_code == 200
        after = _metrics(http)
        health = http.get("/health").json()
    done = ("lorakit_requests_total", (("finish_reason", "length"),))
    assert after[done] - before.get(done, 0) == 1
    assert after[("lorakit_generation_tokens_total", ())] - before[("lorakit_generation_tokens_total", ())] == 5
    assert after[("lorakit_time_to_first_token_seconds_count", ())] >= 1
    assert after[("lorakit_max_batch_size", ())] == 4 and after[("lorakit_adapters_loaded", ())] == 2
    kv = health["kv_cache"]
    per_token = 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 kv heads, head_dim 8, fp32
    assert kv["bytes_per_token"] == per_token == after[("lorakit_kv_cache_bytes_per_token", ())]
    assert kv["cap_bytes"] == 4 * min(64 + 200, 256) * per_token == after[("lorakit_kv_cache_cap_bytes", ())]
    assert (health["scheduler"], health["admission"]) == ("continuous", "shortest")
    assert health["rows_running"] == 0 and kv["held_bytes"] == 0


def test_a_client_that_disconnects_frees_its_row(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=60) as http:
        before = _metrics(http).get(("lorakit_requests_total", (("finish_reason", "cancelled"),)), 0)
    with httpx.Client(base_url=url, timeout=0.1) as http, pytest.raises(httpx.ReadTimeout):
        _complete(http, max_tokens=200)  # the client gives up and closes the connection
    with httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").json()["rows_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert http.get("/health").json()["rows_running"] == 0
        after = _metrics(http)
    assert after[("lorakit_requests_total", (("finish_reason", "cancelled"),))] == before + 1
