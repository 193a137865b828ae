"""Preference training on pairs: DPO (against the base model with the adapters switched off), ORPO and
SimPO (reference-free). The losses are ``train/losses/preference.py``; the data ``data/preference.py``.

A micro-batch holds ``batch_size`` pairs: their chosen rows then their rejected rows, one forward
(``sequence_logps``). DPO's reference is the same model under ``lk.disable_adapters`` — a second,
gradient-free forward per step — or, with ``--precompute-ref``, log-probs computed once before the
first step (``reference.py``). The loop divides the summed per-pair losses by the global pair count.
Figures every logging step carry TRL's names: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...data.batching import BatchSampler
from ...data.preference import (
    CPU_PACK_MULTIPLE,
    PreferenceSet,
    extract_prompt,
    pair_batch,
    read_pairs,
    tokenize_pairs,
)
from ...errors import ConfigError
from ...lora.adapters import disable_adapters
from ...models.attention import NAME as ATTENTION
from ...models.attention import packed_attention_for
from ..losses.preference import DEFAULT_BETA, PreferenceLosses, check_preference_args, preference_loss
from .base import Objective, StepLoss
from .logps import sequence_logps
from .reference import reference_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


class PairBatches:
    """Seeded shuffled batches of pairs (``batch_size`` pairs = 2·batch_size rows per micro-batch); every
    rank draws the same global batch and keeps pairs ``rank::world``; resumable exactly."""

    def __init__(self, pairs: PreferenceSet, batch_size: int, grad_accum: int, pad_id: int, seed: int,
                 rank: int = 0, world: int = 1, layout: str = "padded", multiple: int = 0) -> None:
        self.pairs, self.grad_accum, self.pad_id, self.rank, self.world = pairs, grad_accum, pad_id, rank, world
        self.layout, self.multiple = layout, multiple
        self.sampler = BatchSampler(len(pairs), batch_size, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.grad_accum)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [pair_batch(self.pairs, next(self.sampler)[self.rank::self.world], self.pad_id, self.layout,
                           self.multiple) for _ in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """The padding share of the first epoch's micro-batches (padded: rows padded to the longest of the
        batch; packed layouts: the span that rounds a row up to ``multiple``) and the tokens the layout runs per
        pair token of TRL's padded rows."""
        lengths = [(len(p), len(c), len(r)) for p, c, r in self.pairs.pairs]
        real = padded = run = packed = 0
        for batch in self.sampler.epoch_batches(0):
            widest = max(p + max(c, r) for p, c, r in (lengths[i] for i in batch))
            real += sum(2 * p + c + r for p, c, r in (lengths[i] for i in batch))
            padded += 2 * widest * len(batch)
            row = sum((p if self.layout == "shared" else 2 * p) + c + r for p, c, r in (lengths[i] for i in batch))
            packed += row
            run += -(-row // self.multiple) * self.multiple if self.multiple else row
        if self.layout == "padded":
            return {"layout": self.layout, "padding_fraction": 1 - real / padded if padded else 0.0,
                    "tokens_vs_padded": 1.0}
        return {"layout": self.layout, "padding_fraction": 1 - packed / run if run else 0.0,
                "tokens_vs_padded": run / padded if padded else 1.0}


def metric_sums(out: PreferenceLosses) -> dict[str, tuple[float, float]]:
    """TRL's figures of a micro-batch as (sum, pairs)."""
    n = float(len(out.losses))
    margins = out.chosen_rewards - out.rejected_rewards
    values = (out.chosen_rewards, out.rejected_rewards, (margins > 0).float(), margins, out.chosen_logps,
              out.rejected_logps)
    return {k: (float(v.sum()), n) for k, v in zip(METRICS, values, strict=True)}


class DPO(Objective):
    """Direct Preference Optimization against the base model (the adapters switched off)."""

    name = "dpo"
    plotted = ("rewards/accuracies", "rewards/margins")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.beta = cfg.beta or DEFAULT_BETA[self.name]  # 0: the objective's default
        check_preference_args(self.name, cfg.loss_type, self.beta, cfg.label_smoothing)
        if cfg.packing:
            raise ConfigError(f"--packing packs supervised examples; {self.name} lays pairs out with --pair-layout "
                              "(auto: each pair's prompt once, in one row, where the model allows it)")
        self.layout = "padded" if cfg.pair_layout == "auto" else cfg.pair_layout  # resolved by attention()
        self.multiple = 0  # packed rows' width rounded up to a multiple of this: set by attention()
        if cfg.precompute_ref and self.name != "dpo":
            raise ConfigError(f"--precompute-ref computes a reference model's log-probs; {self.name} has none")
        if cfg.full and self.name == "dpo" and not cfg.precompute_ref:
            raise ConfigError("dpo's reference is the model with its adapters off; --full trains every weight, so "
                              "there are none to switch off and the reference would move with the policy. Pass "
                              "--precompute-ref (the reference log-probs of the model before training, computed once)")
        self.ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> precomputed (chosen, rejected)
        self.datasets: dict[str, PreferenceSet | None] = {}

    # -- data -------------------------------------------------------------------------------------------------
    def read(self, cfg, paths) -> dict[str, Any]:
        return {"train": read_pairs(paths.train, cfg.skip_bad_pairs),
                "eval": read_pairs(paths.eval, cfg.skip_bad_pairs) if paths.eval else None}

    def tokenize(self, records: dict[str, Any], tokenizer: Any, cfg, info, progress: bool):
        if tokenizer is None:
            raise ConfigError(f"{records['train'].path}: preference pairs are text; the model came without a "
                              "tokenizer")
        sets = {k: tokenize_pairs(v, tokenizer, cfg.max_seq_len, cfg.skip_bad_pairs) if v is not None else None
                for k, v in records.items()}
        self.datasets = sets  # prepare() precomputes their reference log-probs
        if info.main:
            for split, ds in sets.items():
                if ds is not None and ds.stats.skipped:
                    print(f"lorakit: {split} data: skipped {ds.stats.n_dropped:,} bad pairs (--skip-bad-pairs): "
                          + ", ".join(f"{n:,} {why}" for why, n in sorted(ds.stats.skipped.items())), flush=True)
        return sets, {k: "not used (pairs tokenize in seconds)" for k in records}

    def attention(self, model: torch.nn.Module, cfg) -> str | None:
        """Resolve --pair-layout against the model: "shared" needs lorakit's packed attention, "packed" any
        attention that reads packed rows (that one or flash-attention); auto takes the first that fits."""
        if cfg.pair_layout == "padded":
            return None
        name = packed_attention_for(model)  # None: not a transformers model on sdpa/eager (left as it is)
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if cfg.pair_layout == "auto":
            self.layout = "shared" if name == ATTENTION else "packed" if current == "flash_attention_2" else "padded"
        elif cfg.pair_layout == "shared" and name != ATTENTION:
            raise ConfigError(f"--pair-layout shared needs lorakit's packed attention, which takes transformers "
                              f"models on SDPA or eager attention; this model runs {name or current!r}. Use "
                              "--pair-layout packed (flash-attention) or padded")
        elif cfg.pair_layout == "packed" and current not in (ATTENTION, "flash_attention_2"):
            raise ConfigError(f"--pair-layout packed needs an attention that reads packed rows (lorakit's, or "
                              f"flash-attention); this model runs {current!r}. Use --pair-layout padded")
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.multiple = CPU_PACK_MULTIPLE if on_cpu and self.layout != "padded" else 0
        return name

    def batch(self, ds: PreferenceSet, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The micro-batch of pairs ``rows`` of ``ds`` in this run's layout."""
        return pair_batch(ds, rows, pad_id, self.layout, self.multiple)

    def make_batches(self, train_ds: PreferenceSet, cfg, pad_id: int, info) -> PairBatches:
        return PairBatches(train_ds, cfg.batch_size, cfg.grad_accum, pad_id, cfg.seed, info.rank, info.world,
                           self.layout, self.multiple)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, cfg, info, progress: bool) -> None:
        """With --precompute-ref: the reference log-probs of every train and eval pair, computed once (or read
        from the cache beside the token cache)."""
        if not cfg.precompute_ref:
            return
        for split, ds in self.datasets.items():
            if ds is not None:
                self.ref[split] = reference_logps(model, tokenizer, ds, cfg, self.pad_id(tokenizer, cfg), info,
                                                  progress, self.layout, self.multiple)

    # -- the loss ---------------------------------------------------------------------------------------------
    def reference(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], split: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs: precomputed, or the model with its adapters off."""
        if split in self.ref:
            chosen, rejected = self.ref[split]
            return chosen[batch["pair_index"]], rejected[batch["pair_index"]]
        with torch.no_grad(), disable_adapters(model):
            ref = sequence_logps(model, batch)
        return ref.chosen, ref.rejected

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], split: str = "train"
               ) -> PreferenceLosses:
        cfg = self.cfg
        pol = sequence_logps(model, batch)
        ref = self.reference(model, batch, split) if self.name == "dpo" else (None, None)
        return preference_loss(pol.chosen, pol.rejected, *ref, objective=self.name, loss_type=cfg.loss_type,
                               beta=self.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                               chosen_tokens=pol.chosen_tokens, rejected_tokens=pol.rejected_tokens)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        out = self.losses(model, batch)
        return StepLoss(out.losses.sum(), float(len(out.losses)), int(batch["attention_mask"].sum()),
                        metric_sums(out))

    # -- evaluation and the held-out score --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, eval_ds: PreferenceSet, cfg, pad_id: int, info) -> dict[str, float]:
        """The loss and TRL's figures over the validation pairs (``eval_loss``, ``eval_rewards/...``)."""
        from ..distributed import all_sum

        was = model.training
        model.eval()
        sums = {k: 0.0 for k in ("loss", *METRICS)}
        n = 0.0
        starts = list(range(0, len(eval_ds), cfg.batch_size))[:cfg.eval_batches or None]
        for start in starts:
            rows = list(range(start, min(start + cfg.batch_size, len(eval_ds))))[info.rank::info.world]
            if not rows:  # a short last batch; FSDP still needs this rank in the forward
                self.losses(model, self.batch(eval_ds, [start], pad_id), "eval")
                continue
            out = self.losses(model, self.batch(eval_ds, rows, pad_id), "eval")
            sums["loss"] += float(out.losses.sum())
            for k, (s, _) in metric_sums(out).items():
                sums[k] += s
            n += len(rows)
        model.train(was)
        total = all_sum(info, n, *sums.values())
        figures = {("eval_" + k): (v / total[0] if total[0] else math.nan) for k, v in zip(sums, total[1:],
                                                                                            strict=True)}
        return figures

    def score(self, model: torch.nn.Module, tokenizer: Any, test_path: Path | None, cfg,
              progress: bool) -> dict[str, Any] | None:
        """Held-out figures before and after: ``preference_accuracy`` (the share of test pairs whose chosen
        completion the model finds likelier than the rejected one: summed log-probs for dpo, per-token means
        for orpo and simpo), and greedy ``exact_match`` of the chosen completion from the prompt."""
        from ..evaluate import exact_match_score

        if test_path is None:
            return None
        records = read_pairs(test_path, cfg.skip_bad_pairs)
        ds = tokenize_pairs(records, tokenizer, cfg.max_seq_len, cfg.skip_bad_pairs)
        limit = min(cfg.score_limit or len(ds), len(ds))
        pad = self.pad_id(tokenizer, cfg)
        wins = 0
        was = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, limit, cfg.batch_size):
                lp = sequence_logps(model, self.batch(ds, list(range(start, min(start + cfg.batch_size, limit))), pad))
                if self.name == "dpo":
                    wins += int((lp.chosen > lp.rejected).sum())
                else:
                    wins += int((lp.chosen / lp.chosen_tokens > lp.rejected / lp.rejected_tokens).sum())
        model.train(was)
        raw = [r for _, chunk in records.raw_chunks(1000) for r in chunk]
        rows = [sft_record(raw[i]) for i in ds.sources[:limit]]
        em = exact_match_score(model, tokenizer, rows, cfg.max_new_tokens, progress=progress)
        return {"preference_accuracy": wins / limit, "exact_match": em["exact_match"], "n": limit,
                "examples": em["examples"]}


def sft_record(row: dict[str, Any]) -> dict[str, Any]:
    """A pair as the exact-match scorer takes it: the prompt and the chosen completion."""
    prompt, chosen, _ = extract_prompt(row)
    if isinstance(chosen, str):
        return {"prompt": prompt, "completion": chosen}
    return {"messages": [*prompt, *chosen]}


class ORPO(DPO):
    """Odds-ratio preference optimisation: the chosen completion's NLL plus β times the odds-ratio term;
    no reference model."""

    name = "orpo"


class SimPO(DPO):
    """SimPO: a margin between the per-token mean log-probs of chosen and rejected; no reference model."""

    name = "simpo"
