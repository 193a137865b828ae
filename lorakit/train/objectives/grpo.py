"""GRPO: online RL with verifiable rewards, rolled out by lorakit's own generation core on the model being trained.

Each optimizer step (``num_iterations`` steps per rollout batch):

    prompts (seeded sampler) ──► generate(): G completions per prompt, the adapter in place, prefix sharing,
        seeded per step (a resumed run samples the same rollouts) ──► reward functions (TRL's signature)
        ──► group-relative advantages ──► micro-batches of batch_size completions
    each micro-batch ──► log-probs recomputed by the training forward (as TRL: sampling numerics never bias
        the gradient) ──► clipped objective (+ β·KL with the adapters switched off, lk.disable_adapters; skipped at β = 0)
        ──► loss summed over its units (losses/grpo.py)

``batch_size`` counts completions per micro-batch (TRL's per_device_train_batch_size), so a step trains on
batch_size × grad_accum completions of batch_size × grad_accum / num_generations prompts (per process).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ...generate import Completion, SamplingParams, generate
from ...lora.adapters import disable_adapters
from ..losses.grpo import (
    LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    nanstd,
    per_token_terms,
    policy_metrics,
    reduce_loss,
)
from ..rewards import combine, load_rewards, score_completions
from .base import Objective, StepLoss
from .grpo_data import PromptBatches, PromptSet, read_prompts, tokenize_prompts
from .grpo_logps import completion_logps

SAMPLES_SHOWN = 4  # completions shown (samples.jsonl, the trackers) per logged step


def check_config(cfg) -> None:
    """The GRPO fields of a recipe, checked when the run starts (before data or model load)."""
    if cfg.grpo_loss_type not in LOSS_TYPES:
        raise ConfigError(f"grpo_loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.grpo_loss_type!r}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {cfg.scale_rewards!r}")
    for name, low in (("num_generations", 2), ("max_completion_length", 1), ("num_iterations", 1), ("rollout_rows", 1)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if (cfg.batch_size * cfg.grad_accum) % cfg.num_generations:
        raise ConfigError(f"batch_size × grad_accum = {cfg.batch_size * cfg.grad_accum} completions per step is not a "
                          f"multiple of num_generations={cfg.num_generations}; each prompt's group trains whole")
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature must be > 0 for GRPO rollouts (a group needs different completions), got "
                          f"{cfg.temperature!r}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg.top_p!r}")
    for name in ("beta", "epsilon", "epsilon_high"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.packing:
        raise ConfigError("--packing packs supervised examples; GRPO trains on its own rollouts")


class GRPO(Objective):
    """Group Relative Policy Optimization on prompt-only rows with reward functions (TRL's GRPOTrainer loss)."""

    name = "grpo"
    plotted = ("reward",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        check_config(cfg)
        self.rewards = load_rewards(cfg.reward, cfg.reward_weights)
        self.tokenizer: Any = None
        self.main = True
        self.info: Any = None  # the run's DistInfo (None: one process)
        self.buffer: list[dict[str, torch.Tensor]] | None = None  # the rollout batch, reused num_iterations steps
        self.pending: dict[str, tuple[float, float]] = {}  # rollout figures, reported with the step's first loss
        self.clock: dict[str, float] = {}  # this step's timings, logged by step_done
        self.shown: list[dict[str, Any]] = []  # this step's sample rows, handed to the reporters by samples()

    # -- data -------------------------------------------------------------------------------------------------
    def read(self, cfg, paths) -> dict[str, Any]:
        return {"train": read_prompts(paths.train, cfg.columns),
                "eval": read_prompts(paths.eval, cfg.columns) if paths.eval else None}

    def tokenize(self, records: dict[str, Any], tokenizer: Any, cfg, info, progress: bool):
        sets = {k: tokenize_prompts(v, tokenizer, cfg.max_completion_length) if v is not None else None
                for k, v in records.items()}
        return sets, {k: "not needed (prompts are encoded as generate() encodes them)" for k in records}

    def make_batches(self, train_ds: PromptSet, cfg, pad_id: int, info) -> PromptBatches:
        per_rank = cfg.batch_size * cfg.grad_accum // cfg.num_generations
        return PromptBatches(train_ds, per_rank * info.world, cfg.seed, info.rank, info.world)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, cfg, info, progress: bool) -> None:
        self.tokenizer, self.main, self.info = tokenizer, info.main, info
        self.pad = self.pad_id(tokenizer, cfg)

    # -- rollouts ---------------------------------------------------------------------------------------------
    def next_step(self, source: PromptBatches, model: torch.nn.Module, step: int) -> list[dict[str, torch.Tensor]]:
        """A new rollout batch every ``num_iterations`` steps (else the buffered one), as micro-batches."""
        t0 = time.perf_counter()
        self.clock = {}
        if self.buffer is None or step % self.cfg.num_iterations == 0:
            self.buffer = self.rollout(source, model, step)
        self.clock["train_start"] = time.perf_counter()
        self.clock["time/generation_s"] = self.clock["train_start"] - t0
        return self.buffer

    def step_done(self) -> dict[str, float]:
        """This step's split of time: ``time/generation_s`` (sampling, rewards, advantages, reference and old
        log-probs: TRL's _generate_and_score_completions; 0 on a step that reuses its rollout batch),
        ``time/training_s`` (log-probs, loss, backward, optimizer step) and ``rollout/tokens_per_s``
        (completion tokens per second of sampling alone, on rollout steps)."""
        if "train_start" not in self.clock:
            return {}
        out = {k: v for k, v in self.clock.items() if k != "train_start"}
        out["time/training_s"] = time.perf_counter() - self.clock["train_start"]
        self.clock = {}
        return out

    def rollout(self, source: PromptBatches, model: torch.nn.Module, step: int) -> list[dict[str, torch.Tensor]]:
        from ..distributed import all_gather_rows, unwrap

        cfg, g = self.cfg, self.cfg.num_generations
        rows = source.next_step()
        prompts, columns = source.prompts.rows.take(rows)
        t0 = time.perf_counter()
        sampling = SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                                  # a stream per (seed, step); completion j of the step's prompt i (over every
                                  # rank) draws from seed + i * G + j, so a rollout does not depend on the ranks
                                  seed=(cfg.seed + 1) * 2**40 + step * 2**20 + source.offset * g)
        groups = generate(unwrap(model), self.tokenizer, [source.prompts.ids[i] for i in rows], n=g,
                          sampling=sampling, prefix_sharing=True, max_rows=cfg.rollout_rows)
        sampling_s = time.perf_counter() - t0
        flat = [c for group in groups for c in group]
        # every process's rewards, in the order of the step's prompts: advantages, their batch std and the
        # figures are those of the whole step (as TRL gathers them), whatever the number of processes
        per_fn = all_gather_rows(self.info, self.rewards_of(prompts, columns, flat)[0])  # (N, F)
        total = combine(per_fn, [r.weight for r in self.rewards])
        advantages, zero_std = group_advantages(total, g, cfg.scale_rewards)
        lengths = [len(c.token_ids) for c in flat]
        self.clock["rollout/tokens_per_s"] = sum(lengths) / max(sampling_s, 1e-9)
        truncated = torch.tensor([c.finish_reason == "length" for c in flat])
        self.pending.update(rollout_metrics(per_fn, total, zero_std, lengths, truncated,
                                            [fn_name(r) for r in self.rewards]))
        mine = slice(source.offset * g, source.offset * g + len(flat))  # this process's completions
        per_fn, total, advantages = per_fn[mine], total[mine], advantages[mine]
        if self.main and (step == 0 or (step + 1) % cfg.log_every == 0):
            self.shown = self.sample_rows(prompts, flat, per_fn, total, advantages)
        bs = cfg.batch_size
        batches = [self.collate(flat[s:s + bs], advantages[s:s + bs], truncated[s:s + bs])
                   for s in range(0, len(flat), bs)]
        if not sum(int(b["completion_mask"].sum()) for b in batches):
            batches[0]["units_if_empty"] = torch.tensor(1.0)  # dapo's normaliser is clamped at 1, as TRL's
        with torch.no_grad():
            for b in batches:
                if cfg.beta != 0.0:
                    with disable_adapters(model):
                        b["ref_logps"] = self.logps(model, b)
                if cfg.num_iterations > 1:
                    b["old_logps"] = self.logps(model, b)
        return batches

    def rewards_of(self, prompts: list[Any], columns: dict[str, list[Any]], flat: list[Completion]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, F) each function's rewards, (N,) their weighted sum) of a rollout's completions, TRL's inputs."""
        g = len(flat) // len(prompts)
        reps = [p for p in prompts for _ in range(g)]
        completions = [[{"role": "assistant", "content": c.text}] if isinstance(p, list) else c.text
                       for c, p in zip(flat, reps, strict=True)]
        cols = {k: [v for v in vals for _ in range(g)] for k, vals in columns.items()}
        per_fn = score_completions(self.rewards, reps, completions, [list(c.token_ids) for c in flat], cols)
        return per_fn, combine(per_fn, [r.weight for r in self.rewards])

    def collate(self, comps: list[Completion], advantages: torch.Tensor, truncated: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Prompts left-padded to a common width P, completions right-padded to C: (b, P + C) rows whose
        completions start at column P (positions count real tokens only, so padding changes nothing)."""
        p = max(len(c.prompt_ids) for c in comps)
        w = max(len(c.token_ids) for c in comps)
        ids = torch.full((len(comps), p + w), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, c in enumerate(comps):
            ids[i, p - len(c.prompt_ids):p] = torch.tensor(c.prompt_ids)
            ids[i, p:p + len(c.token_ids)] = torch.tensor(c.token_ids)
            attn[i, p - len(c.prompt_ids):p + len(c.token_ids)] = 1
        mask = attn[:, p:].clone()
        if self.cfg.mask_truncated_completions:
            mask[truncated] = 0  # DAPO's overlong filtering: a cut completion says nothing about its reward
        return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
                "completion_mask": mask, "advantages": advantages.float()}

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(b, C) log π(token) of each completion token under log_softmax(logits / temperature), as TRL scores;
        each prompt computed once for the completions packed after it (``grpo_logps``)."""
        return completion_logps(model, batch, self.cfg.temperature)

    # -- the loss ---------------------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        cfg = self.cfg
        mask = batch["completion_mask"]
        eps_high = cfg.epsilon_high or None
        terms = per_token_terms(self.logps(model, batch), batch["advantages"], batch.get("old_logps"),
                                batch.get("ref_logps"), cfg.epsilon, eps_high, cfg.beta)
        total, units = reduce_loss(terms.loss, mask, cfg.grpo_loss_type, cfg.max_completion_length)
        if not units and "units_if_empty" in batch:
            units = float(batch["units_if_empty"])
        metrics = policy_metrics(terms, batch["advantages"], mask, cfg.epsilon, eps_high)
        metrics.update(self.pending)
        self.pending = {}
        return StepLoss(total, units, int(batch["attention_mask"].sum()), metrics)

    # -- figures ----------------------------------------------------------------------------------------------
    def greedy_rewards(self, model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, limit: int = 0,
                       progress: bool = False) -> tuple[torch.Tensor, list[Completion], list[Any]]:
        """(rewards, completions, prompts) of greedy completions of the first ``limit`` prompts (0: all)."""
        n = min(limit or len(prompts), len(prompts))
        rows = list(range(n))
        texts, columns = prompts.rows.take(rows)
        groups = generate(model, tokenizer, [prompts.ids[i] for i in rows], n=1,
                          sampling=SamplingParams(max_tokens=self.cfg.max_completion_length, temperature=0.0),
                          max_rows=self.cfg.rollout_rows, progress=progress)
        flat = [g[0] for g in groups]
        return self.rewards_of(texts, columns, flat)[1], flat, texts

    def evaluate(self, model: torch.nn.Module, eval_ds: PromptSet, cfg, pad_id: int, info) -> dict[str, float]:
        """Mean reward of greedy completions of the validation prompts; ``eval_loss`` is its negative."""
        from ..distributed import unwrap

        rewards, _, _ = self.greedy_rewards(unwrap(model), self.tokenizer, eval_ds, cfg.eval_batches * cfg.batch_size)
        mean = float(torch.nanmean(rewards))
        return {"eval_loss": -mean, "eval_reward": mean}

    def score(self, model: torch.nn.Module, tokenizer: Any, test_path: Path | None, cfg,
              progress: bool) -> dict[str, Any] | None:
        """The held-out figures before/after: greedy completions of the test prompts, their mean reward and
        ``pass_rate``, the share whose reward reaches ``pass_reward``."""
        if test_path is None:
            return None
        prompts = tokenize_prompts(read_prompts(test_path, cfg.columns), tokenizer, cfg.max_completion_length)
        rewards, flat, texts = self.greedy_rewards(model, tokenizer, prompts, cfg.score_limit, progress)
        passed = [bool(r >= cfg.pass_reward) for r in rewards.tolist()]  # NaN (unscorable) does not pass
        shown = [{"prompt": p, "completion": c.text, "reward": _num(r)}
                 for p, c, r in list(zip(texts, flat, rewards.tolist(), strict=True))[:5]]
        return {"pass_rate": sum(passed) / len(passed), "reward": float(torch.nanmean(rewards)), "n": len(passed),
                "examples": shown}

    def sample_rows(self, prompts: list[Any], flat: list[Completion], per_fn: torch.Tensor, total: torch.Tensor,
                    advantages: torch.Tensor) -> list[dict[str, Any]]:
        """A few completions of this rollout with their rewards and advantages (samples.jsonl, the trackers)."""
        g = len(flat) // len(prompts)
        names = [fn_name(r) for r in self.rewards]
        return [{"prompt": prompts[i // g], "completion": flat[i].text, "reward": _num(float(total[i])),
                 "advantage": float(advantages[i]),
                 "rewards": {n: _num(float(v)) for n, v in zip(names, per_fn[i], strict=True)},
                 "finish_reason": flat[i].finish_reason} for i in range(min(SAMPLES_SHOWN, len(flat)))]

    def samples(self) -> list[dict[str, Any]]:
        shown, self.shown = self.shown, []
        return shown

    # -- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The buffered rollout batch when it is still to be reused (num_iterations > 1): the resumed run
        trains on the very completions, advantages and old log-probs the straight run would."""
        if self.cfg.num_iterations == 1 or self.buffer is None:
            return {}
        return {"buffer": [{k: {"dtype": str(v.dtype).removeprefix("torch."), "data": v.tolist()}
                            for k, v in b.items()} for b in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("buffer"):
            self.buffer = [{k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])) for k, v in b.items()}
                           for b in state["buffer"]]


def rollout_metrics(per_fn: torch.Tensor, total: torch.Tensor, zero_std: torch.Tensor, lengths: list[int],
                    truncated: torch.Tensor, names: list[str]) -> dict[str, tuple[float, float]]:
    """A rollout's figures under TRL's names, as (sum, count): the rewards' over the whole step (every process
    reports them: the sums and counts scale alike), the lengths' over this process's completions."""
    scored = ~torch.isnan(total)
    n = float(len(lengths))
    out = {"reward": (float(total[scored].sum()), float(scored.sum())),
           "reward_std": (float(nanstd(total)) if int(scored.sum()) > 1 else 0.0, 1.0),
           "frac_reward_zero_std": (float(zero_std.sum()), float(zero_std.numel())),
           "completions/mean_length": (float(sum(lengths)), n),
           "completions/clipped_ratio": (float(truncated.sum()), n)}
    for i, name in enumerate(names):
        col = per_fn[:, i]
        ok = ~torch.isnan(col)
        out[f"rewards/{name}/mean"] = (float(col[ok].sum()), float(ok.sum()))
    return out


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def fn_name(reward) -> str:
    """The name a reward function's figures go under (``rewards/<name>/mean``): the function's own, as TRL."""
    return getattr(reward.fn, "__name__", reward.name)
