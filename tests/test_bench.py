"""The benchmark suite's plumbing (bench/): every figure runs in --quick mode on a tiny random model
and writes its JSON and the markdown table. No timing is asserted here (DESIGN.md rule 9): speed
claims live in bench/results/, measured side by side."""

from __future__ import annotations

import json

import pytest
import torch
from builders import char_tokenizer, tiny_llama

TINY = "test_bench:tiny_chat_model"  # importable by the memory worker too (it inherits sys.path)


def tiny_chat_model():
    tok = char_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))  # the char tokenizer has a few more ids than tiny_llama's 96
    return model, tok


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Every figure once in --quick mode (about a minute on 2 cores: the tests that use it are slow)."""
    from bench import run as bench_run
    from bench.harness import Context

    out = tmp_path_factory.mktemp("bench")
    ctx = Context.quick_run(model=TINY, out=out, repeats=2, seq=128, threads=1, threads_why="test")
    threads = torch.get_num_threads()
    try:
        results = bench_run.run(ctx, command="pytest")
    finally:
        torch.set_num_threads(threads)  # the suite sets its own; later tests keep theirs
    return out, {r["name"]: r for r in results}


@pytest.mark.slow
def test_every_figure_writes_its_json(suite):
    from bench.harness import SCHEMA, read_results
    from bench.run import NAMES

    out, results = suite
    assert list(results) == NAMES
    on_disk = read_results(out)
    assert set(on_disk) == set(NAMES)
    for name, r in on_disk.items():
        assert r == json.loads(json.dumps(results[name], default=str))
        assert r["schema"] == SCHEMA and r["run"]["quick"] and r["config"]["model"] == TINY
        assert {"cpu", "torch", "peft", "transformers", "threads", "git_commit"} <= set(r["machine"])
        assert r["run"]["load"]["min"] <= r["run"]["load"]["max"]
        for table in r["tables"]:
            assert table["caption"] and all(len(row) == len(table["columns"]) for row in table["rows"])
        for t in r["targets"]:
            assert t["status"] in ("MET", "MISSED") and t["reason"] and t["value"] > 0


@pytest.mark.slow
def test_figures_hold_what_the_issue_asks(suite):
    _, r = suite
    steps = r["train_step"]["data"]["steps"]
    fp32 = {"full", "lorakit p=0", "peft p=0", "lorakit p=0.05", "peft p=0.05"}
    variants = {"lorakit p=0.05 +ckpt", "lorakit p=0.05 +lk loss", "lorakit p=0.05 unfused", "lorakit p=0.05 bf16 unfused"}
    assert set(steps) == fp32 | {f"{k} bf16" for k in fp32} | variants
    assert all(s["n"] == 2 and len(s["samples"]) == 2 for s in steps.values())
    assert len(r["train_step"]["tables"]) == 3  # fp32, bf16 base, and lorakit's trainer loss on chat data
    assert [len(t["rows"]) for t in r["train_step"]["tables"][:2]] == [8, 6]
    assert [t["limit"] for t in r["train_step"]["targets"]] == [1.0, 0.85, 1.0, 0.85]
    assert len(r["lora_vs_full"]["targets"]) == 4
    mem = r["step_memory"]["data"]["cases"]
    assert set(mem) == set(steps) and all(c["increase"] > 0 for c in mem.values())
    assert mem["full"]["trainable"] == mem["full"]["params"] > mem["lorakit p=0"]["trainable"]
    assert mem["lorakit p=0"]["trainable"] == mem["peft p=0"]["trainable"]
    assert r["lora_vs_full"]["data"]["limit"] == pytest.approx(2 / 3 + 2 * 8 / 32)
    assert [t["op"] for t in r["forward_latency"]["targets"]] == ["within", "within"]
    assert r["adapter_io"]["targets"][0]["limit"] == 0.5
    assert "CPU only" in r["mixed_throughput"]["skipped"]
    q = r["qlora"]["data"]
    sizes = {k: v["bytes"] for k, v in q["resident"].items()}
    assert list(sizes) == ["fp32", "bf16", "nf4", "nf4 + double quant"]
    assert abs(sizes["fp32"] - 2 * sizes["bf16"]) <= 4096 and sizes["bf16"] > sizes["nf4"]
    assert set(q["steps"]) == set(q["memory"]) == {f"{k} p={p:g} qlora" for k in ("lorakit", "peft") for p in (0, 0.05)}
    assert [t["limit"] for t in r["qlora"]["targets"]] == [1.0, 0.9, 0.85, 0.35]


@pytest.mark.slow
def test_competitors_compute_the_same_thing(suite):
    """Sanity, not speed: at B = 0 every competitor starts from the base model's loss, and lorakit
    and PEFT hold the same adapter in the latency figure."""
    _, r = suite
    first = r["train_step"]["data"]["first_loss"]
    for half in (False, True):
        losses = [v for k, v in first.items() if k.endswith(" bf16") == half]
        assert max(losses) - min(losses) < (2e-2 if half else 1e-5)  # bf16 cases: LoRA bf16 base vs autocast
    qlora = r["qlora"]["data"]["first_loss"]  # the same bitsandbytes layers under both adapters
    assert max(qlora.values()) - min(qlora.values()) < 1e-5
    for key, diff in r["forward_latency"]["data"]["batch 1"]["max_abs_logit_diff"].items():
        assert diff > 1e-3 if key.startswith("adapter effect") else diff < 1e-4, key


@pytest.mark.slow
def test_readme_table(suite):
    out, results = suite
    text = (out / "README.md").read_text()
    assert "QUICK RUN" in text and "## Targets (issue 7)" in text and "| machine |" in text
    for r in results.values():
        assert f"## {r['figure']}. {r['title']}" in text
        assert all(t["what"] in text for t in r["targets"])
    assert "SKIPPED" in text and (out / ".gitignore").read_text() == "*\n"


def test_mixed_figure_from_mixed_batch_results():
    from bench.lora.mixed_throughput import summarize

    row = {"max_abs_logit_diff_vs_peft": 1e-6, "prefill_tokens_per_s": {"lorakit": 300.0, "peft": 100.0},
           "decode_tokens_per_s": {"lorakit": 20.0, "peft": 16.0}, "prefill_speedup": 3.0, "decode_speedup": 1.25}
    res = {"model": "m", "rows": 8, "seq": 64, "rank": 16, "threads": 1, "reps": 5,
           "mixed": [{**row, "adapters": n} for n in (1, 4, 8)],
           "latency": {"unmerged_over_base": 1.1, "merged_over_base": 1.0, "base_ms": 100.0}}
    fig = summarize(res)
    assert [t["status"] for t in fig["targets"]] == ["MET", "MISSED"]
    assert len(fig["tables"][0]["rows"]) == 3


def test_command_line():
    from bench.run import parse

    ctx, names = parse(["--quick", "--only", "train_step", "adapter_io", "--repeats", "4", "--threads", "1"])
    assert names == ["train_step", "adapter_io"] and ctx.quick and ctx.repeats == 4 and ctx.threads == 1
    assert ctx.out.name == "quick"
    ctx, names = parse([])
    assert names is None and ctx.repeats == 5 and ctx.batch == 4 and ctx.seq == 128 and ctx.out.name == "results"
    with pytest.raises(SystemExit):
        parse(["--only", "nonsense"])


def test_fresh_process_arms_rotate_and_answer(capsys):
    """alternate_processes runs A B, B A, A B ...; each arm's worker is a fresh interpreter whose
    emit() line is its answer (other output ignored); a failing or silent worker is an error."""
    import os

    from bench.harness import RESULT_PREFIX, alternate_processes, emit, run_worker

    emit({"x": 1})
    assert capsys.readouterr().out == RESULT_PREFIX + '{"x": 1}\n'
    code = ("import json, os, sys; print('noise'); "
            f"print({RESULT_PREFIX!r} + json.dumps({{'arm': sys.argv[1], 'pid': os.getpid()}}))")
    order, seen = [], []

    def arm(name):
        def one(i):
            order.append(name)
            return run_worker(["-c", code, name])
        return one

    res = alternate_processes({"a": arm("a"), "b": arm("b")}, rounds=3, after_round=lambda r: seen.append(
        {k: len(v) for k, v in r.items()}))
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert [r["arm"] for r in res["a"]] == ["a"] * 3 and [r["arm"] for r in res["b"]] == ["b"] * 3
    assert seen == [{"a": n, "b": n} for n in (1, 2, 3)]
    pids = {r["pid"] for rows in res.values() for r in rows}
    assert len(pids) == 6 and os.getpid() not in pids
    with pytest.raises(RuntimeError, match="exit 3"):
        run_worker(["-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match="no answer"):
        run_worker(["-c", "print('hi')"])


def test_load_is_recorded_in_words():
    from bench.harness import LoadMonitor, load_line, recorded

    quiet = {"cores": 2, "min": 0.5, "median": 0.7, "max": 1.0, "n": 3}
    assert load_line(quiet) == "1-min load average during the run 0.5–1.0 (median 0.7) on 2 cores"
    assert "busier than its cores" in load_line({**quiet, "median": 3.0})
    with LoadMonitor(every_s=60) as load:
        rec = recorded(load)
    assert {"when", "cpu", "flags", "logical_cpus", "torch", "transformers", "load"} <= set(rec)
    assert rec["load"]["min"] <= rec["load"]["max"]
