"""--report-to: TensorBoard, wandb (offline) and MLflow (local file store), each read back with its own
reader and compared with metrics.jsonl; Hugging Face Trainer metric names; missing extras fail early."""

from __future__ import annotations

import json
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.train.recipe import TrainConfig
from lorakit.train.trackers import TRACKERS, hf_name, make_trackers, parse_report_to

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


# ---- readers: each tracker's own --------------------------------------------------------------

def read_tensorboard(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """Scalars {tag: [(step, value)]} and the HParams session's hyperparameters, via EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    hparams = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") == "session_start_info":
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = getattr(value, value.WhichOneof("kind"))
    return scalars, hparams


def wandb_records(out: Path, wait_s: float = 60.0) -> list:
    """The records of the offline run under out/wandb, decoded with wandb's own protobuf Record schema
    from its transaction log (wandb ships no Python reader for it any more: a 7-byte file header, then
    leveldb-log chunks of crc32, length, type in 32 KiB blocks). wandb's service process may still be
    writing the log when ``run.finish()`` has returned, so this waits (up to ``wait_s``) for the record
    that ends a run (its exit record) to be in the file."""
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        records = _log_records(path.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _log_records(data: bytes) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at {pos}"
        pos, buf = pos + 7 + length, buf + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def read_wandb(out: Path) -> tuple[list[dict], dict]:
    """History rows and config of the offline run under out/wandb."""
    rows, config = [], {}
    for record in wandb_records(out):
        which = record.WhichOneof("record_type")
        if which == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif which in ("run", "config"):
            items = record.run.config.update if which == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return rows, config


def wandb_exit_code(out: Path) -> int | None:
    """The exit code the offline run under out/wandb recorded when it ended (None: it never ended)."""
    codes = [r.exit.exit_code for r in wandb_records(out) if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None


def read_mlflow(uri: str, run_id: str) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return history, run.data.params


def expected_from_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {HF name: [(step, value)]}: what every tracker must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(hf_name(key), []).append((record["step"], value))
    return out


def assert_same(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want)
    for name, series in want.items():
        assert [s for s, _ in got[name]] == [s for s, _ in series], name
        for (_, a), (_, b) in zip(got[name], series, strict=True):
            assert a == pytest.approx(b, rel=rel, abs=1e-12), name


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline and MLflow on a local file store, both inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ---- names and parsing --------------------------------------------------------------------------

def _trainer_rewrite_logs():
    """transformers' own rewrite_logs, taken from its source (importing integration_utils pulls in every
    integration: over a minute on a busy machine)."""
    import ast
    import importlib.util

    root = Path(importlib.util.find_spec("transformers").origin).parent
    tree = ast.parse((root / "integrations" / "integration_utils.py").read_text(encoding="utf-8"))
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "rewrite_logs"]
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "integration_utils.py", "exec"), namespace)
    return namespace["rewrite_logs"]


def test_names_are_the_hf_trainers():
    rewrite_logs = _trainer_rewrite_logs()
    # the keys the Trainer puts in its logs (trainer.py: _maybe_log_save_evaluate, speed_metrics("train"))
    ours_to_trainer = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm",
                       "tokens_per_s": "train_tokens_per_second", "eval_loss": "eval_loss",
                       "epoch": "epoch", "tokens": "num_input_tokens_seen"}
    for ours, trainer in ours_to_trainer.items():
        (expected,) = rewrite_logs({trainer: 1.0})
        assert hf_name(ours) == expected
    assert hf_name("loss") == "train/loss" and hf_name("eval_loss") == "eval/loss"


def test_report_to_is_parsed_and_checked():
    assert TrainConfig(report_to="tensorboard, wandb,tensorboard").report_to == ["tensorboard", "wandb"]
    assert TrainConfig(report_to=["mlflow"]).report_to == ["mlflow"]
    assert TrainConfig(report_to="none").report_to == [] and TrainConfig().report_to == []
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*tensorboard, wandb, mlflow"):
        TrainConfig(report_to="tensorbord")
    assert parse_report_to(",".join(TRACKERS)) == list(TRACKERS)


@pytest.mark.parametrize("tracker, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("mlflow", "mlflow")])
def test_a_missing_extra_names_its_install_command(tmp_path, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf"pip install 'lorakit\[{tracker}\]'"):
        make_trackers(["tensorboard", tracker], tmp_path, resuming=False)
    assert not (tmp_path / "tensorboard").exists()  # nothing started before the check


def test_mlflow_without_a_usable_store_says_how_to_set_one(tmp_path, monkeypatch):
    from lorakit.errors import TrainingError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(TrainingError, match="MLFLOW_TRACKING_URI.*MLFLOW_ALLOW_FILE_STORE"):
        make_trackers(["mlflow"], tmp_path, resuming=False)


# ---- the reporters read back --------------------------------------------------------------------

def _feed(reporters, records, params):
    for r in reporters:
        r.log_params(params)
    for record in records:
        for r in reporters:
            r.log(record["step"], {k: v for k, v in record.items() if k != "step"})
    for r in reporters:
        r.close()


def test_each_tracker_reads_back_what_was_logged(tmp_path, offline):
    records = [{"step": s, "loss": 1 / s, "lr": 1e-3 * s, "grad_norm": 0.5 + s, "tokens_per_s": 1000.0 + s}
               for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.625}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    want = expected_from_metrics(tmp_path / "metrics.jsonl")
    params = TrainConfig(r=4, target_modules=["q_proj", "v_proj"]).to_dict()
    _feed(make_trackers(list(TRACKERS), tmp_path, resuming=False), records, params)

    tb, hp = read_tensorboard(tmp_path / "tensorboard")
    assert_same(tb, want, rel=1e-6)  # event files hold float32
    assert hp["r"] == 4 and hp["target_modules"] == "q_proj,v_proj" and hp["lr"] == pytest.approx(2e-3)

    rows, config = read_wandb(tmp_path)
    wb = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key != "train/global_step":
                wb.setdefault(key, []).append((row["train/global_step"], value))
    assert_same(wb, want, rel=1e-12)
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]

    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    ml, ml_params = read_mlflow(offline, run_id)
    assert_same(ml, want, rel=1e-12)
    assert ml_params["r"] == "4" and ml_params["max_steps"] == str(params["max_steps"])


# ---- a training run ----------------------------------------------------------------------------

def _cfg(model_dir, tmp_path, **kw):
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes"} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(model=str(model_dir), data=str(data), eval_data=str(data), out=str(tmp_path / "run"), max_steps=8,
                batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4, save_every=4, log_every=2, max_seq_len=32,
                r=4, alpha=8, seed=3, dtype="float32")
    return TrainConfig(**{**base, **kw})


def test_a_run_reports_to_every_tracker_what_metrics_jsonl_holds(tiny_model_dir, tmp_path, offline):
    from lorakit.train.loop import train

    cfg = _cfg(tiny_model_dir, tmp_path, report_to="tensorboard,wandb,mlflow")
    train(cfg, progress=False)
    out = Path(cfg.out)
    want = expected_from_metrics(out / "metrics.jsonl")
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/train_tokens_per_second",
            "eval/loss"} <= set(want) and len(want["train/loss"]) == 4 and len(want["eval/loss"]) == 2

    tb, hp = read_tensorboard(out / "tensorboard")
    assert_same(tb, want, rel=1e-6)
    assert hp["report_to"] == "tensorboard,wandb,mlflow" and hp["max_steps"] == 8

    rows, config = read_wandb(out)
    wb = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key != "train/global_step":
                wb.setdefault(key, []).append((row["train/global_step"], value))
    assert_same(wb, want, rel=1e-12)
    assert config["lr"] == 1e-2 and config["out"] == cfg.out

    ml, params = read_mlflow(offline, json.loads((out / "trackers.json").read_text())["mlflow"])
    assert_same(ml, want, rel=1e-12)
    assert params["seed"] == "3" and params["report_to"] == "tensorboard,wandb,mlflow"


def test_a_missing_tracker_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(loop, "build_model", no_model)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'lorakit\[wandb\]'"):
        loop.train(_cfg(tiny_model_dir, tmp_path, report_to="wandb"), progress=False)


def test_only_rank_0_reports(tmp_path, offline):
    from lorakit.train.reporting import make_reporters

    cfg = TrainConfig(report_to="tensorboard,mlflow", out=str(tmp_path))
    others = make_reporters(cfg, tmp_path, main=False, resume_step=None)
    others.log(1, {"loss": 1.0})
    others.close()
    assert others.reporters == [] and list(tmp_path.iterdir()) == []
    main = make_reporters(cfg, tmp_path, main=True, resume_step=None)
    assert [type(r).__name__ for r in main.reporters] == ["JsonlReporter", "TensorBoardReporter", "MlflowReporter"]
    main.close()


class _Killed(Exception):
    pass


def raising_in_call(n: int, exc: type[BaseException], real):
    """``real`` (the causal-LM objective's loss_sum) that raises ``exc`` on its n-th call instead."""
    calls = []

    def wrapped(model, batch):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(model, batch)

    return wrapped


def test_a_resumed_run_continues_its_tracker_runs(tiny_model_dir, tmp_path, offline, monkeypatch):
    import lorakit.train.loop as loop
    import lorakit.train.objectives.base as objective_base

    cfg = _cfg(tiny_model_dir, tmp_path, report_to="tensorboard,mlflow", max_steps=12, log_every=1)
    real = objective_base.loss_sum
    # steps 5 and 6 are logged after the step-4 checkpoint, then a crash in step 7
    monkeypatch.setattr(objective_base, "loss_sum", raising_in_call(7, _Killed, real))
    with pytest.raises(_Killed):
        loop.train(cfg, progress=False)
    out = Path(cfg.out)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    from mlflow import MlflowClient

    assert MlflowClient(offline).get_run(run_id).info.status == "FAILED"  # the crash ended the run as failed
    monkeypatch.setattr(objective_base, "loss_sum", real)
    loop.train(TrainConfig(**{**cfg.to_dict(), "resume": True}), progress=False)
    assert MlflowClient(offline).get_run(run_id).info.status == "FINISHED"

    want = expected_from_metrics(out / "metrics.jsonl")  # steps 1..12 once each (the resume truncated it)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 13))
    tb, _ = read_tensorboard(out / "tensorboard")
    assert_same(tb, want, rel=1e-6)  # the killed run's steps 5 and 6 are purged
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id  # the same MLflow run goes on

    history = MlflowClient(offline).get_metric_history(run_id, "train/loss")
    latest = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m.value  # MLflow cannot delete values: the resumed run's come later at steps 5, 6
    assert_same({"train/loss": sorted(latest.items())}, {"train/loss": want["train/loss"]}, rel=1e-12)


def test_an_interrupted_run_ends_its_tracker_runs_as_killed(tiny_model_dir, tmp_path, offline, monkeypatch):
    import lorakit.train.loop as loop
    import lorakit.train.objectives.base as objective_base

    cfg = _cfg(tiny_model_dir, tmp_path, report_to="wandb,mlflow", max_steps=6, log_every=1)
    real = objective_base.loss_sum
    monkeypatch.setattr(objective_base, "loss_sum", raising_in_call(3, KeyboardInterrupt, real))  # Ctrl-C in step 3
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    out = Path(cfg.out)
    from mlflow import MlflowClient

    assert MlflowClient(offline).get_run(json.loads((out / "trackers.json").read_text())["mlflow"]).info.status \
        == "KILLED"
    assert wandb_exit_code(out) == 255  # wandb marks a non-zero exit as failed
    # and a run that ends normally records exit code 0
    monkeypatch.setattr(objective_base, "loss_sum", real)
    (tmp_path / "b").mkdir()
    cfg2 = _cfg(tiny_model_dir, tmp_path / "b", report_to="wandb", max_steps=2, log_every=1)
    loop.train(cfg2, progress=False)
    assert wandb_exit_code(Path(cfg2.out)) == 0


# ---- sample rows (GRPO's completions) -----------------------------------------------------------

def read_tensorboard_text(logdir: Path, tag: str) -> dict[int, str]:
    """{step: text} of a text summary, via EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


SAMPLES = [{"prompt": [{"role": "user", "content": "date | of\nthe day"}], "completion": "2024-01-0|2\nok",
            "reward": 0.5, "advantage": -1.25, "rewards": {"iso_date": 0.5, "short": None}, "finish_reason": "stop"},
           {"prompt": "plain", "completion": "x", "reward": 1.0, "advantage": 0.75,
            "rewards": {"iso_date": 1.0, "short": 1.0}, "finish_reason": "length"}]


def test_sample_rows_reach_samples_jsonl_and_every_tracker(tmp_path, offline):
    from lorakit.train.reporting import make_reporters

    cfg = TrainConfig(out=str(tmp_path), report_to="tensorboard,wandb,mlflow")
    reporters = make_reporters(cfg, tmp_path, main=True, resume_step=None)
    for step in (1, 3):
        reporters.log(step, {"loss": 1.0 / step})
        reporters.log_samples(step, SAMPLES)
    reporters.log_samples(4, [])  # nothing to show: nothing written
    reporters.close()

    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, **row} for s in (1, 3) for row in SAMPLES]

    texts = read_tensorboard_text(tmp_path / "tensorboard", "train/samples")
    assert sorted(texts) == [1, 3]
    table = texts[3].splitlines()
    assert table[0] == ("| prompt | completion | reward | advantage | rewards/iso_date | rewards/short | "
                        "finish_reason |")
    assert len(table) == 2 + len(SAMPLES)
    assert "2024-01-0\\|2<br>ok" in table[2] and '"content": "date \\| of' in table[2] and "-1.25" in table[2]

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows, _ = read_wandb(tmp_path)
    logged = [r for r in rows if "train/samples/path" in r]  # the table's reference, nested keys flattened
    assert [r["train/global_step"] for r in logged] == [1, 3]
    assert logged[-1]["train/samples/_type"] == "table-file" and logged[-1]["train/samples/nrows"] == 2
    path = run_dir / "files" / logged[-1]["train/samples/path"]
    table = json.loads(path.read_text())
    assert table["columns"][:2] == ["prompt", "completion"] and table["data"][1][:2] == ["plain", "x"]
    assert table["data"][0][4:6] == [0.5, None]

    from mlflow import MlflowClient

    client = MlflowClient(offline)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_000001.jsonl",
                                                                          "samples/step_000003.jsonl"]
    got = Path(client.download_artifacts(run_id, "samples/step_000003.jsonl", str(tmp_path / "dl")))
    assert [json.loads(x) for x in got.read_text().splitlines()] == [{"step": 3, **row} for row in SAMPLES]
