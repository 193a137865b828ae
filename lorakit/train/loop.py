"""The training loop: one flat function, resumable, LoRA or full fine-tuning, for any objective.

    recipe ──► data (checked before the model loads) ──► model + LoRA ──► steps ──► adapter/

What a step minimises, on which data, is the run's ``Objective`` (``objectives/``): the loop only
back-propagates each micro-batch's summed loss and divides by the global count of its units.

Everything before the first step is ``start`` (set-up pieces in ``setup.py``, ``batches.py``,
``reporting.py``, ``resume.py``); everything after the last is ``result.finish``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..models.custom import is_custom_spec
from ..models.lean import lean_layers
from .checkpoint import list_checkpoints, save_checkpoint
from .inputs import check_memory, data_report, report_lines
from .memory import check_allocator, fix_mmap_threshold
from .objectives import Objective, StepLoss, make_objective
from .objectives.base import mean_metrics
from .recipe import TrainConfig, save_recipe
from .reporting import Reporters, make_reporters
from .result import finish
from .resume import clean_partial_checkpoints, gather_state, restore
from .setup import (
    DataPaths,
    build_model,
    check_space,
    describe_base,
    make_optimizer,
    make_scheduler,
    prepare_out,
    resolve_data,
    resolve_dtype,
    total_steps,
)
from .trackers import require_trackers


def train(cfg: TrainConfig, progress: bool = True, fit_check=None, *, model: torch.nn.Module | None = None,
          tokenizer: Any = None, objective: Objective | None = None) -> dict[str, Any]:
    """Run a training recipe end to end and return the summary (also written to out/summary.json).

    Under torchrun each process trains on its rows of every global batch; rank 0 alone logs,
    checkpoints and writes the results.

    Args:
        cfg: the resolved recipe.
        progress: show tqdm bars (rank 0 only).
        fit_check: ``lorakit.plan.fit.check_fit`` (what ``lorakit train`` passes), run before the first
            step: a warning when the planned peak exceeds free memory, or with
            ``gradient_checkpointing="auto"``, checkpointing turned on. None: no check ("auto" is off).
        model: a model built (and adapted) already, trained instead of the one ``cfg.model`` names; with
            ``tokenizer`` (or None) and ``objective`` (None: the recipe's). The Python API's way in
            (``train/api.py``).
    """
    from .distributed import barrier, setup, teardown

    info = setup(cfg.dist_timeout)
    lock = None
    try:
        if info.main:
            lock = prepare_out(Path(cfg.out), cfg.resume)  # held until the run ends
        barrier(info)
        result = _train(cfg, progress and info.main, info, fit_check, (model, tokenizer, objective))
        barrier(info)  # every rank past its last collective before the group goes (gloo aborts a rank otherwise)
        return result
    finally:
        if lock is not None:
            os.close(lock)
        teardown(info)


@dataclass
class Run:
    """What the loop works with, made by ``start``."""

    model: torch.nn.Module  # wrapped for DDP / FSDP under torchrun
    tokenizer: Any
    objective: Objective  # what the loop minimises, on which data (objectives/)
    paths: DataPaths
    train_ds: Any  # the objective's training set (a TokenizedDataset for sft)
    eval_ds: Any
    pad_id: int
    opt: torch.optim.Optimizer
    sched: Any
    batches: Any  # a batch source (batches.py)
    reporters: Reporters
    total: int  # optimizer steps of the whole run (max_steps, or from epochs)
    step: int  # optimizer steps already taken (non-zero when resumed)
    st: dict  # train state saved in checkpoints: best/last eval, patience, tokens, elapsed, score before


def start(cfg: TrainConfig, out: Path, progress: bool, info, fit_check=None, given: tuple = (None, None, None)) -> Run:
    """Everything before the first step: data checked before the model loads, model, optimizer,
    batch source, reporters, and the state of a resumed run. ``given``: (model, tokenizer, objective)
    handed over in Python (each None: built from the recipe; a given model is not built or adapted)."""
    from .distributed import unwrap, wrap

    paths = resolve_data(cfg)
    objective = given[2] or make_objective(cfg)
    records = objective.read(cfg, paths)  # fail on bad data before spending time on the model
    if info.world > cfg.batch_size:
        raise TrainingError(f"batch_size {cfg.batch_size} is smaller than the {info.world} processes; "
                            "each process needs at least one row of every micro-batch")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if info.main:
        require_trackers(cfg.report_to)  # a missing tracker extra fails before the model loads
    dtype, dtype_why = resolve_dtype(cfg, info.device)
    allocator = check_allocator(cfg.cpu_allocator)  # lorakit train preloads tcmalloc where it can (memory.py)
    if cfg.low_cpu_memory:
        fix_mmap_threshold(info.device)  # CPU: freed activations go back to the system (see memory.py)
    if info.main:
        print(f"lorakit: CPU allocator: {allocator}" + (" with the fixed mmap threshold" if cfg.low_cpu_memory and
                                                        allocator == "glibc" else ""), flush=True)
    model, tokenizer = build_model(cfg, dtype) if given[0] is None else given[:2]
    lean_layers(model)  # RMSNorm and the SiLU MLP keep less for backward, same numbers (models/lean.py)
    if info.main:
        print(f"lorakit: {describe_base(model, dtype, dtype_why)}", flush=True)
    model.to(info.device)
    attention = objective.attention(model, cfg)  # e.g. per-example attention in packed rows
    if info.main and attention:
        print(f"lorakit: packed rows attend per example ({attention} attention)", flush=True)
    pad_id = objective.pad_id(tokenizer, cfg)
    datasets, cache_outcome = objective.tokenize(records, tokenizer, cfg, info, progress)
    train_ds, eval_ds = datasets["train"], datasets["eval"]
    if info.main:
        check_space(out, model, cfg)
        clean_partial_checkpoints(out / "checkpoints")
        save_recipe(cfg, out / "config.yaml")
    if fit_check is not None and given[0] is None and not is_custom_spec(cfg.model):  # the planner reads configs
        check_memory(fit_check, model, train_ds, cfg, dtype, info)
    model = wrap(model, info, cfg.fsdp)
    opt = make_optimizer(model, cfg)
    batches = objective.make_batches(train_ds, cfg, pad_id, info)
    data = data_report(records, datasets, cache_outcome, batches, cfg)
    if attention:
        data["train"]["attention"] = attention
    if info.main:
        for line in report_lines(data, cfg):
            print(f"lorakit: {line}", flush=True)
    total = total_steps(cfg, batches.steps_per_epoch)
    if info.main and cfg.epochs:
        print(f"lorakit: {cfg.epochs:g} epochs = {total} optimizer steps ({batches.steps_per_epoch} per epoch)",
              flush=True)
    sched = make_scheduler(opt, cfg, total)
    st = {"best_eval": None, "bad_evals": 0, "tokens": 0, "elapsed": 0.0, "before": None, "last_eval": None}
    ckpts = list_checkpoints(out / "checkpoints")
    step = 0
    if cfg.resume and ckpts:
        step, st = restore(ckpts[-1], model, opt, sched, batches, info)
        objective.load_state_dict(st.get("objective", {}))
    elif info.main or cfg.fsdp:
        st["before"] = objective.score(unwrap(model), tokenizer, paths.test, cfg, progress)
    objective.prepare(model, tokenizer, cfg, info, progress)
    st["data"] = data
    st["cpu_allocator"] = allocator
    st["steps_per_epoch"] = batches.steps_per_epoch
    reporters = make_reporters(cfg, out, info.main, step if cfg.resume and ckpts else None)
    return Run(model, tokenizer, objective, paths, train_ds, eval_ds, pad_id, opt, sched, batches, reporters, total,
               step, st)


def step_totals(parts: list[StepLoss], info) -> tuple[float, float, float, dict[str, float]]:
    """(loss sum, units, tokens, mean of each metric) of one optimizer step over this rank's micro-batches
    and every rank, in one collective."""
    from .distributed import all_sum

    names = sorted({k for p in parts for k in p.metrics})
    local = [sum(float(p.loss.detach()) for p in parts), sum(p.units for p in parts), sum(p.tokens for p in parts)]
    for k in names:
        local += [sum(p.metrics.get(k, (0.0, 0.0))[0] for p in parts), sum(p.metrics.get(k, (0.0, 0.0))[1]
                                                                          for p in parts)]
    total = all_sum(info, *local)
    sums = {k: (total[3 + 2 * i], total[4 + 2 * i]) for i, k in enumerate(names)}
    if not total[1]:
        raise TrainingError("an optimizer step had nothing to train on (no target tokens / units in any "
                            "micro-batch); check the data's labels")
    return total[0], total[1], total[2], mean_metrics(sums)


def scale_grads(params: list[torch.nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def _check_finite(train_loss: float, grad_norm: float, step: int, out: Path) -> None:
    if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
        last = list_checkpoints(out / "checkpoints")
        raise TrainingError(f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step "
                            f"{step}; stopped without saving. Last good checkpoint: "
                            f"{last[-1] if last else 'none'}. Lower --lr or check the data.")


def _evaluate(run: Run, cfg: TrainConfig, step: int, info, bar) -> bool:
    """Validation loss now; updates best / patience in the train state. Returns whether to stop early."""
    st = run.st
    figures = run.objective.evaluate(run.model, run.eval_ds, cfg, run.pad_id, info)
    ev = figures["eval_loss"]
    st["last_eval"] = ev
    if info.main:
        run.reporters.log(step, figures)
        bar.write(f"step {step}: eval loss {ev:.4f}")
    if st["best_eval"] is None or ev < st["best_eval"]:
        st["best_eval"], st["bad_evals"] = ev, 0
        return False
    st["bad_evals"] += 1
    return bool(cfg.patience) and st["bad_evals"] >= cfg.patience


def _train(cfg: TrainConfig, progress: bool, info, fit_check=None, given: tuple = (None, None, None)
           ) -> dict[str, Any]:
    run = start(cfg, Path(cfg.out), progress, info, fit_check, given)
    try:
        result = _loop(run, cfg, progress, info)
    except BaseException as exc:  # the trackers' runs end marked as failed (killed on Ctrl-C), not left open
        run.reporters.close(status="killed" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    run.reporters.close()
    return result


def _loop(run: Run, cfg: TrainConfig, progress: bool, info) -> dict[str, Any]:
    """The training loop proper: from ``run.step`` to ``run.total`` optimizer steps (or a pause or an
    early stop), then the results."""
    from .distributed import barrier

    out = Path(cfg.out)
    model, opt, sched, st, step, total = run.model, run.opt, run.sched, run.st, run.step, run.total
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint() -> None:
        st["objective"] = run.objective.state_dict()
        gathered = gather_state(model, opt, sched, run.batches, st, info)
        if info.main:
            save_checkpoint(out / "checkpoints", step, *gathered[:3], gathered[3], cfg.keep_checkpoints)
        barrier(info)

    model.train()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    t_last, tok_last, stopped_early = time.perf_counter(), st["tokens"], False
    while step < total and not stopped_early:
        t0 = time.perf_counter()
        parts = []
        for batch in run.objective.next_step(run.batches, model, step):  # this rank's micro-batches
            part = run.objective.loss(model, batch)  # summed over the micro-batch's units
            part.loss.backward()
            parts.append(part)
        loss_total, n_units, n_seen, metrics = step_totals(parts, info)  # one collective a step
        # DDP/FSDP averaged the summed-loss gradients over ranks: × world / n_units gives the gradient
        # of the mean loss over the global batch's units (target tokens for sft)
        scale_grads(params, info.world / n_units)
        train_loss = loss_total / n_units
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        _check_finite(train_loss, grad_norm, step + 1, out)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.update(run.objective.step_done())  # this process's figures of the finished step (timings)
        step += 1
        st["tokens"] += int(n_seen)
        st["elapsed"] += time.perf_counter() - t0
        bar.update(1)
        run.reporters.log_samples(step, run.objective.samples())  # rank 0 holds the reporters, others none
        if info.main and (step % cfg.log_every == 0 or step == total):
            now = time.perf_counter()
            tps = (st["tokens"] - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, st["tokens"]
            lr = sched.get_last_lr()[0]
            run.reporters.log(step, {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                                     **metrics})
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        if run.eval_ds is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            stopped_early = _evaluate(run, cfg, step, info, bar)
        pause = bool(cfg.stop_after) and step >= cfg.stop_after and step < total
        if (cfg.save_every and step % cfg.save_every == 0) or step == total or stopped_early or pause:
            checkpoint()
        if pause:
            bar.close()
            return {"paused_at": step, "checkpoint": str(list_checkpoints(out / "checkpoints")[-1])} \
                if info.main else {}
    bar.close()
    return finish(model, run.tokenizer, out, cfg, run.paths, st, step, stopped_early, info, progress, run.objective)
