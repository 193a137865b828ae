"""lorakit train --objective dpo / orpo / simpo end to end on a tiny model: TRL's figures every logging step
and in evaluation, before/after preference accuracy in summary.json, --precompute-ref giving the same steps
as the reference forward, an exact resume (a pause, and kill -9), and bad settings refused before the model
loads."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError, DataError
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

ROWS = [{"prompt": f"{i} is ", "chosen": "even" if i % 2 == 0 else "odd", "rejected": "odd!" if i % 2 == 0 else "even"}
        for i in range(24)]
CONV = [{"prompt": [{"role": "user", "content": f"{i}?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]} for i in range(6)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(model_dir, tmp_path, name="out", **kw):
    data = write(tmp_path / "train.jsonl", ROWS[:16] + CONV)
    held = write(tmp_path / "eval.jsonl", ROWS[16:])
    return TrainConfig(**{"model": str(model_dir), "data": str(data), "eval_data": str(held), "test_data": str(held),
                          "out": str(tmp_path / name), "objective": "dpo", "max_steps": 6, "batch_size": 4,
                          "lr": 1e-2, "warmup_steps": 1, "max_seq_len": 48, "eval_every": 3, "log_every": 1,
                          "dtype": "float32", "max_new_tokens": 4, "data_cache": str(tmp_path / "cache"),
                          "seed": 3, **kw})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


def test_dpo_logs_trls_figures_every_step_and_the_before_after_score(tiny_model_dir, tmp_path):
    summary = train(cfg(tiny_model_dir, tmp_path), progress=False)
    rows = metrics(tmp_path / "out")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and all(TRL_NAMES <= set(r) for r in steps)
    first = steps[0]  # the adapter starts at B = 0: the policy is the reference at step 1
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-6)
    assert steps[-1]["loss"] < first["loss"] and steps[-1]["rewards/margins"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all({"eval_rewards/accuracies", "eval_logps/chosen"} <= set(r) for r in evals)
    for when in ("before", "after"):
        assert set(summary[when]) >= {"preference_accuracy", "exact_match", "n"} and summary[when]["n"] == 8


def test_precomputed_reference_gives_the_steps_of_the_reference_forward(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, "plain"), progress=False)
    train(cfg(tiny_model_dir, tmp_path, "pre", precompute_ref=True), progress=False)
    assert list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "pre"), strict=True):
        for k in a.keys() & (TRL_NAMES | {"eval_loss"}):
            if not (k == "rewards/accuracies" and a["step"] == 1):  # margins of ±1e-8 at step 1 (policy = reference)
                assert a[k] == pytest.approx(b[k], abs=1e-5), k
    with pytest.raises(ConfigError, match="orpo has none"):
        train(cfg(tiny_model_dir, tmp_path, "o", objective="orpo", precompute_ref=True), progress=False)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_every_pair_layout_trains_the_same_steps(tiny_model_dir, tmp_path, capsys, objective):
    runs = {}
    for layout in ("padded", "packed", "auto"):
        train(cfg(tiny_model_dir, tmp_path, layout, objective=objective, pair_layout=layout, max_steps=4),
              progress=False)
        runs[layout] = metrics(tmp_path / layout)
    printed = capsys.readouterr().out
    assert "pairs laid out shared (--pair-layout)" in printed  # auto took the shared prompt on this llama
    assert "pairs laid out padded (--pair-layout)" in printed
    for layout in ("packed", "shared"):  # on CPU packed rows are rounded up to 128 tokens (CPU_PACK_MULTIPLE)
        share = re.search(rf"pairs laid out {layout} \(--pair-layout\): \d+% of the tokens of padded rows; "
                          r"([\d.]+)% padding", printed)
        assert share and float(share.group(1)) > 0, printed
    for layout in ("packed", "auto"):
        for a, b in zip(runs["padded"], runs[layout], strict=True):
            for k in a.keys() & (TRL_NAMES | {"eval_loss"}):
                if not (k == "rewards/accuracies" and a["step"] == 1):
                    assert a[k] == pytest.approx(b[k], abs=1e-4), (layout, k)


def test_full_fine_tuning_dpo_keeps_the_model_before_training_as_its_reference(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, full=True, precompute_ref=True, max_steps=4, lr=1e-3), progress=False)
    steps = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["loss"] < steps[0]["loss"]  # the reference stayed put


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_train_without_a_reference_pass(tiny_model_dir, tmp_path, monkeypatch, objective):
    import lorakit.train.objectives.preference as pref

    def refuse(model):
        raise AssertionError("a reference-free objective switched the adapters off")

    monkeypatch.setattr(pref, "disable_adapters", refuse)
    train(cfg(tiny_model_dir, tmp_path, objective=objective), progress=False)
    steps = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert all(r["logps/chosen"] > -20 for r in steps)  # per-token means, not sums


def test_a_paused_run_resumes_exactly(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, "straight"), progress=False)
    assert "paused_at" in train(cfg(tiny_model_dir, tmp_path, "paused", stop_after=4), progress=False)
    train(cfg(tiny_model_dir, tmp_path, "paused", resume=True), progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "paused" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["per-step", "precomputed"])
def test_kill_nine_during_dpo_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path, reference):
    """kill -9 after a checkpoint, while one is being written, and (--precompute-ref) once the reference pass
    has cached the train pairs' log-probs; then --resume gives the adapter of a run never stopped."""
    pre = reference == "precomputed"
    train(cfg(tiny_model_dir, tmp_path, "straight", max_steps=16, save_every=2, eval_every=8, precompute_ref=pre),
          progress=False)
    c = cfg(tiny_model_dir, tmp_path, "faulted", max_steps=16, save_every=2, eval_every=8)
    cache = tmp_path / "faulted-cache"  # its own: the reference pass runs again, and is killed in
    args = ["train", "--model", c.model, "--data", c.data, "--eval-data", c.eval_data, "--out", c.out,
            "--objective", "dpo", "--max-steps", "16", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
            "--max-seq-len", "48", "--eval-every", "8", "--save-every", "2", "--log-every", "1", "--dtype",
            "float32", "--seed", "3", "--max-new-tokens", "4", "--data-cache", str(cache), "--cpu-allocator",
            "glibc", *(["--precompute-ref"] if pre else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    ckpts = tmp_path / "faulted" / "checkpoints"

    # each plan makes its condition when its process starts
    def reference_cached():  # the pass has written the train pairs' reference log-probs
        return lambda: any((cache / "reference").glob("*.safetensors"))

    def checkpoint_at(step):
        return lambda: any(int(p.name[5:]) >= step for p in ckpts.glob("step-*"))

    def writing():  # a checkpoint is being written (not a temp dir an earlier kill left); at step 14 at the latest
        old, late = set(ckpts.glob(".step-*")), checkpoint_at(14)
        return lambda: bool(set(ckpts.glob(".step-*")) - old) or late()

    plans = [reference_cached] if pre else []
    plans += [lambda: checkpoint_at(3), writing, lambda: checkpoint_at(9)]
    for i, plan in enumerate(plans):
        ready = plan()
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args, *(["--resume"] if i else [])],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
    done = subprocess.run([sys.executable, "-m", "lorakit", *args, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "faulted" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(ckpts.glob(".step-*"))  # no half-written checkpoint left behind
    steps = [r["step"] for r in metrics(tmp_path / "faulted")]
    assert steps == sorted(steps) and steps[-1] == 16


def test_bad_settings_and_bad_pairs_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(ConfigError, match="--packing"):
        train(cfg(missing, tmp_path, packing=True), progress=False)
    with pytest.raises(ConfigError, match="loss_type"):
        train(cfg(missing, tmp_path, loss_type="nope"), progress=False)
    with pytest.raises(ConfigError, match="--precompute-ref"):  # full fine-tuning has no adapters to switch off
        train(cfg(missing, tmp_path, full=True), progress=False)
    bad = write(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*missing \['rejected'\]"):
        train(cfg(missing, tmp_path, data=str(bad)), progress=False)


# hostile rows, each with the reason --skip-bad-pairs counts it under
HOSTILE = [
    ('{"prompt": "q", "chosen": "a"}', "malformed"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "malformed"),
    ('{"prompt": null, "chosen": null, "rejected": "b"}', "malformed"),
    ('{"prompt": "q", "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"}', "malformed"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "malformed"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": "b"}', "malformed"),
    ("[1, 2]", "malformed"),
    ('"a pair"', "malformed"),
    ("{}", "malformed"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', "identical"),
    ('{"chosen": "all shared", "rejected": "all shared"}', "empty_completion"),  # the implicit prompt is all
    ('{"prompt": "q", "chosen": " \\t\\n ", "rejected": "b"}', "empty_completion"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": ""}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "empty_completion"),
    (json.dumps({"prompt": "x" * 200, "chosen": "a", "rejected": "b"}), "prompt_too_long"),
]


def interleave(path, good, bad):
    """The good rows with a bad one after every other row (and blank lines); the bad rows' line numbers."""
    lines, at = [], []
    for i, row in enumerate(good):
        lines.append(json.dumps(row))
        if i % 2 and bad:
            lines += ["", bad.pop(0)]
            at.append(len(lines))
    path.write_text("\n".join(lines + bad) + "\n")
    return at + list(range(len(lines) + 1, len(lines) + len(bad) + 1))


@pytest.mark.parametrize(("line", "reason"), HOSTILE, ids=[f"{r}-{i}" for i, (_, r) in enumerate(HOSTILE)])
def test_a_hostile_row_stops_the_run_naming_its_line(tiny_model_dir, tmp_path, line, reason):
    data = tmp_path / "hostile.jsonl"
    (at,) = interleave(data, ROWS[:4], [line])
    with pytest.raises(DataError, match=rf"hostile\.jsonl:{at}: "):
        train(cfg(tiny_model_dir, tmp_path, data=str(data)), progress=False)
    if reason == "malformed":  # caught by reading, before the model loads
        with pytest.raises(DataError, match=rf"hostile\.jsonl:{at}: "):
            train(cfg(tmp_path / "no-model", tmp_path, data=str(data)), progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("line", [b'{"prompt": "q", "chosen": "a", "rejected": "b"', b'{"prompt": "caf\xe9"}',
                                  b'{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}'],
                         ids=["json", "utf8", "surrogate"])
def test_a_line_no_reader_parses_stops_the_run_even_when_skipping(tmp_path, line):
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=r"hostile\.jsonl:2: (invalid JSON|not valid UTF-8|not valid Unicode)"):
        train(cfg(tmp_path / "no-model", tmp_path, data=str(data), skip_bad_pairs=True), progress=False)


def test_hostile_rows_skipped_train_as_the_clean_rows_alone(tiny_model_dir, tmp_path, capsys):
    """--skip-bad-pairs over train, eval and test files salted with every hostile row: the same steps, adapter,
    evaluation and held-out score as the clean files, with the reference log-probs precomputed (their indices
    are the kept pairs'), and the skips reported by reason."""
    clean = cfg(tiny_model_dir, tmp_path, "clean", precompute_ref=True, skip_bad_pairs=True)
    train(clean, progress=False)
    bad = [line for line, _ in HOSTILE]
    salted = {name: tmp_path / f"hostile-{name}.jsonl" for name in ("train", "eval")}
    interleave(salted["train"], ROWS[:16] + CONV, bad[:])
    interleave(salted["eval"], ROWS[16:], bad[::3])
    capsys.readouterr()
    summary = train(cfg(tiny_model_dir, tmp_path, "salted", data=str(salted["train"]), eval_data=str(salted["eval"]),
                        test_data=str(salted["eval"]), precompute_ref=True, skip_bad_pairs=True,
                        data_cache=str(tmp_path / "salted-cache")), progress=False)
    reasons = {}
    for _, why in HOSTILE:
        reasons[why] = reasons.get(why, 0) + 1
    printed = capsys.readouterr().out
    assert f"train data: skipped {len(HOSTILE)} bad pairs (--skip-bad-pairs): " + ", ".join(
        f"{n} {why}" for why, n in sorted(reasons.items())) in printed
    assert f"eval data: skipped {len(bad[::3])} bad pairs" in printed
    a = load_file(tmp_path / "clean" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "salted" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def figures(run):  # every logged figure but the throughput
        return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in metrics(tmp_path / run)]
    assert figures("salted") == figures("clean")
    before = json.loads((tmp_path / "clean" / "summary.json").read_text())
    for when in ("before", "after"):
        assert summary[when] == before[when] and summary[when]["n"] == 8  # the same 8 test pairs, same prompts


def test_dpo_on_a_4bit_base_uses_the_quantized_base_as_its_reference(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    train(cfg(tiny_model_dir, tmp_path, quantize="nf4", max_steps=3), progress=False)
    steps = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert steps[0]["rewards/margins"] == 0.0  # step 1: the adapter is zero, the policy is the (4-bit) reference
    assert steps[-1]["rewards/margins"] != 0.0


def test_the_reference_cache_is_not_reused_across_layouts_or_attention(tiny_model_dir, tmp_path, capsys):
    """Cached reference sums belong to the arithmetic that made them: another pair layout or attention
    computes its own (in bf16 they differ by tenths of a nat), the same run reads its own back."""
    for name, layout in (("shared", "shared"), ("shared-again", "shared"), ("padded", "padded")):
        train(cfg(tiny_model_dir, tmp_path, name, precompute_ref=True, pair_layout=layout, max_steps=1, eval_every=0),
              progress=False)
    printed = capsys.readouterr().out
    assert printed.count("computed once, cached") == 4  # train and eval sets, for each of the two layouts
    assert printed.count("read from") == 2  # the second shared run
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 4
