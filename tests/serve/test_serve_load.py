"""The server under load and attack (bench/serve/load.py): concurrent clients, adapter churn and hostile
requests against uvicorn on 127.0.0.1. 8 clients x 4 requests here; LORAKIT_TORTURE=1 runs the full 32 x 20."""

from __future__ import annotations

import os

from bench.serve.load import run

TORTURE = os.environ.get("LORAKIT_TORTURE") == "1"
CLIENTS, REQUESTS = (32, 20) if TORTURE else (8, 4)


def test_server_under_load_and_attack():
    out = run(clients=CLIENTS, requests=REQUESTS)
    req, hostile, churn = out["requests"], out["hostile"], out["churn"]
    assert req["sent"] == CLIENTS * REQUESTS and req["status"] == {"200": CLIENTS * REQUESTS}, req
    assert req["5xx"] == 0 and hostile["5xx"] == 0
    assert req["mismatches"] == 0, "a batched answer differs from its single-request result"
    assert hostile["sent"] >= hostile["cases"] > 20 and hostile["not_4xx"] == 0, hostile["examples"]
    assert hostile["unexpected_status"] == 0, hostile["examples"]
    assert churn["cycles"] >= 2 and churn["bad_cycles"] == 0, churn["examples"]
    assert not out["pickle_was_unpickled"]
    assert out["health_after"]["status"] == 200 and out["health_after"]["seconds"] < 30
    assert out["adapters_loaded_after"] == ["a0", "a1", "a2"]  # the churned adapter is gone, the rest intact
    assert out["rss_mib"]["growth"] < 512, out["rss_mib"]  # a sanity bound; the plateau is in docs/reliability.md
