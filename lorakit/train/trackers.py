"""Experiment trackers: TensorBoard, Weights & Biases and MLflow reporters (``--report-to``).

Each is an optional extra, imported only when asked for; a missing one fails at the start of the
run with its install command. Metric names are the Hugging Face Trainer's (its ``rewrite_logs``:
``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``train/train_tokens_per_second``,
``eval/loss``), so dashboards built for Trainer runs show lorakit runs too; the resolved recipe is
logged as hyperparameters. Only rank 0 builds reporters (``reporting.make_reporters``).

Each class has ``reporting.Reporter``'s three methods (``log``, ``log_params``, ``close``); it does
not subclass it because ``reporting`` imports this module to build them (imports form no cycle).

A resumed run continues the same wandb / MLflow run (their ids are kept in ``out/trackers.json``)
and TensorBoard drops the events a killed run wrote after its last checkpoint (``purge_step``).

Sample rows (``log_samples``: GRPO's completions with their rewards) go under ``train/samples``: a markdown
table in TensorBoard's Text tab, a ``wandb.Table``, an MLflow artifact ``samples/step_NNNNNN.jsonl``.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError
from ..fileio import atomic_write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
# metrics.jsonl key -> the name the HF Trainer logs (before its train/ or eval/ prefix)
_HF_NAMES = {"lr": "learning_rate", "tokens_per_s": "train_tokens_per_second", "tokens": "num_input_tokens_seen"}
_IDS_FILE = "trackers.json"


def hf_name(key: str) -> str:
    """The Trainer's name for a metrics.jsonl key: ``eval_loss`` → ``eval/loss``, ``lr`` →
    ``train/learning_rate``, anything else ``train/<key>`` (transformers' ``rewrite_logs``)."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + _HF_NAMES.get(key, key)


def hf_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of one record, renamed for trackers (``step`` is passed on its own)."""
    return {hf_name(k): float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def sample_table(samples: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of sample rows: nested dicts flattened (``rewards/accuracy``), numbers and strings kept,
    anything else (a chat prompt's messages) as JSON text; columns in first-seen order."""
    flat = []
    for row in samples:
        out: dict[str, Any] = {}
        for key, value in row.items():
            items = [(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
            for k, v in items:
                out[k] = v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, ensure_ascii=False)
        flat.append(out)
    columns = list(dict.fromkeys(k for row in flat for k in row))
    return columns, [[row.get(c) for c in columns] for row in flat]


def markdown_table(samples: list[dict[str, Any]]) -> str:
    """Sample rows as a markdown table (TensorBoard's Text tab renders it): pipes escaped, newlines as <br>."""
    columns, rows = sample_table(samples)

    def cell(v: Any) -> str:
        text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def flat_params(params: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Recipe values as tracker hyperparameters accept them: lists joined by commas, None as ''."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in params.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = "" if value is None else value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` (or a YAML list) → checked, de-duplicated names; "none" or empty → []."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                if name not in TRACKERS:
                    raise ConfigError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
                                      "(comma-separated), or none")
                names.append(name)
    return names


def require(tracker: str, module: str):
    """Import ``module`` for ``tracker``, or fail with the extra's install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"--report-to {tracker} needs the {tracker} extra ({exc.name or module} is not "
                          f"installed): pip install 'lorakit[{tracker}]'") from None


class RunIds:
    """The wandb / MLflow run ids of this output directory (out/trackers.json), so a resume continues them."""

    def __init__(self, out: Path, resuming: bool):
        self.path = out / _IDS_FILE
        self.ids: dict[str, str] = {}
        if resuming and self.path.is_file():
            try:
                self.ids = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.ids = {}  # unreadable: start new tracker runs rather than fail the resume

    def get(self, tracker: str) -> str | None:
        return self.ids.get(tracker)

    def set(self, tracker: str, run_id: str) -> None:
        self.ids[tracker] = run_id
        atomic_write_json(self.path, self.ids)


class TensorBoardReporter:
    """Event files in ``out/tensorboard`` (``tensorboard --logdir out/tensorboard``): scalars, the
    recipe as text and in the HParams tab."""

    def __init__(self, out: Path):
        self._writer_cls = require("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.logdir = out / "tensorboard"
        self._writer = None
        self._params: dict[str, Any] | None = None

    def _open(self, step: int):
        if self._writer is None:
            # purge_step: a resumed (or restarted) run hides what an earlier run logged from this step on
            self._writer = self._writer_cls(log_dir=str(self.logdir), purge_step=step)
            if self._params is not None:
                self._write_params(self._params)
        return self._writer

    def _write_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._writer.add_text("recipe", "```\n" + json.dumps(params, indent=1, default=str) + "\n```", 0)
        for summary in hparams(flat_params(params), {"train/loss": 0.0, "eval/loss": 0.0}):
            self._writer.file_writer.add_summary(summary)
        self._writer.flush()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        writer = self._open(step)
        for name, value in hf_metrics(metrics).items():
            writer.add_scalar(name, value, step)
        writer.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self._params = dict(params)  # written when the writer opens (its purge step is the first logged step)
        if self._writer is not None:
            self._write_params(self._params)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        writer = self._open(step)
        writer.add_text("train/samples", markdown_table(samples), step)
        writer.flush()

    def close(self, status: str = "finished") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbReporter:
    """A Weights & Biases run (project ``$WANDB_PROJECT`` or "lorakit", files under ``out/wandb``);
    ``WANDB_MODE=offline`` keeps it local. Metrics are plotted against ``train/global_step`` as the
    Trainer does."""

    def __init__(self, out: Path, ids: RunIds):
        wandb = require("wandb", "wandb")
        run_id = ids.get("wandb")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=out.name, dir=str(out),
                                  id=run_id, resume="allow" if run_id else None)
        except Exception as exc:  # wandb raises its own types (not logged in, no network, bad settings)
            raise TrainingError(f"--report-to wandb: cannot start a run ({type(exc).__name__}: {exc}); log in with "
                                "`wandb login`, or set WANDB_MODE=offline to keep the run local") from None
        ids.set("wandb", self.run.id)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({**hf_metrics(metrics), "train/global_step": step})

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        import wandb

        columns, rows = sample_table(samples)
        self.run.log({"train/samples": wandb.Table(columns=columns, data=rows), "train/global_step": step})

    def close(self, status: str = "finished") -> None:
        # wandb shows a run that ended with a non-zero exit code as "failed" (the code of a Ctrl-C: 255)
        self.run.finish(exit_code={"finished": 0, "failed": 1}.get(status, 255))


class MlflowReporter:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (or "lorakit") at ``$MLFLOW_TRACKING_URI``
    (a server, or a local store such as ``file:./mlruns``), named after the output directory."""

    def __init__(self, out: Path, ids: RunIds):
        mlflow = require("mlflow", "mlflow")
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        uri = mlflow.get_tracking_uri()
        try:
            self.client = mlflow.MlflowClient(uri)
            self.run_id = ids.get("mlflow") or self._new_run(out.name)
            self._logged = set(self.client.get_run(self.run_id).data.params)
            self.client.update_run(self.run_id, status="RUNNING")  # a resumed run that had failed runs again
        except Exception as exc:  # the store's own errors: unsupported URI, server down, file store disabled
            raise TrainingError(f"--report-to mlflow: cannot use the tracking URI {uri!r} ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); set MLFLOW_TRACKING_URI to an MLflow server "
                                "(http://host:5000) or a local store (file:./mlruns with "
                                "MLFLOW_ALLOW_FILE_STORE=true)") from None
        ids.set("mlflow", self.run_id)

    def _new_run(self, name: str) -> str:
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        return self.client.create_run(exp_id, run_name=name).info.run_id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step)
                                                    for k, v in hf_metrics(metrics).items()])

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow refuses to change a logged value: a resumed run keeps the values of the run that started it
        new = [self._param(k, str(v)) for k, v in flat_params(params).items() if k not in self._logged]
        for i in range(0, len(new), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self._logged.update(p.key for p in new)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in samples)
        self.client.log_text(self.run_id, text, f"samples/step_{step:06d}.jsonl")

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())  # FINISHED / FAILED / KILLED


def require_trackers(names: list[str]) -> None:
    """Fail now, with the install command, when a tracker named in ``--report-to`` is not installed
    (the loop's set-up calls this before the model loads)."""
    for name in names:
        require(name, name)


def make_trackers(names: list[str], out: Path, resuming: bool) -> list:
    """Build the reporters named in ``--report-to`` (rank 0 only). Missing extras fail here, before
    any reporter starts a run.

    Args:
        names: tracker names (see ``parse_report_to``).
        out: the run's output directory.
        resuming: the run continues from a checkpoint (continue the same tracker runs).
    """
    require_trackers(names)
    ids = RunIds(out, resuming)
    made: list = []
    try:
        for name in names:
            made.append(TensorBoardReporter(out) if name == "tensorboard" else
                        WandbReporter(out, ids) if name == "wandb" else MlflowReporter(out, ids))
    except BaseException:
        for reporter in made:
            reporter.close("failed")
        raise
    return made
