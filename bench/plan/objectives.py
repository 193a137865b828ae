"""`lorakit plan --objective` vs measured memory on SmolLM2-135M (CPU, fp32, LoRA r=16 on every Linear).

- DPO (and SimPO, no reference): 4 pairs padded to T = 320 (a 64-token prompt, completions of 256 and fewer
  tokens), one step of the objective's own loss (``train/objectives/preference.py``), backward and AdamW step;
  DPO with the reference forward (adapters off) and with ``--precompute-ref`` (no reference forward).
- GRPO, ``configs/demo-grpo.yaml``: 2 prompts of the demo's data × 8 completions of 12 tokens, batch 16,
  rollout_rows 64 (the default); the rollout phase (``GRPO.rollout``: generation through lorakit's core) and
  the training phase (loss, backward, AdamW step) measured apart. The end-of-sequence token is suppressed
  during generation so every completion runs to max_completion_length, the plan's worst case.

Measured: the most bytes of tensor memory live at once during the step, counted from its start
(``lorakit.testing.peak_allocated``: torch.profiler's allocation events; optimizer state exists already, a
warm-up step ran first). Planned: the plan's peak (per phase for GRPO) minus its weights and optimizer rows.
Results: bench/results/plan_objectives.json and .md. Usage: ``python -m bench.plan.objectives`` (a few
minutes on two cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from ..harness import RESULTS, ROOT

MODEL = "smollm2-135m-instruct"
R, ALPHA = 16, 32.0
TOLERANCE = 0.25  # bench/plan/calibration.py's


def _model():
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import inject
    from lorakit.models.lean import lean_layers
    from lorakit.models.load import load_model
    from lorakit.plan.count import count_model

    model, tok = load_model(MODEL, dtype=torch.float32)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
    count = count_model(model, cfg)
    inject(model, cfg)
    lean_layers(model)  # as the trainer runs it (the plan models it)
    return model.train(), tok, count


def _planned(model, count, **inputs) -> dict[str, float]:
    from lorakit.plan.arch import read_arch
    from lorakit.plan.inputs import PlanInputs
    from lorakit.plan.memory import plan_memory

    plan = plan_memory(read_arch(model), count, PlanInputs(dtype="float32", device="cpu", **inputs))
    return {name: row["lora"].bytes for name, row in plan.rows.items()}


def pair_cases(model, count) -> list[dict]:
    from lorakit.data.preference import collate_pairs
    from lorakit.testing import peak_allocated
    from lorakit.train.objectives.preference import DPO, SimPO
    from lorakit.train.recipe import TrainConfig

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 40_000, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(ids(64), ids(256 - 16 * i), ids(240 - 24 * i)) for i in range(4)]
    batch = collate_pairs(pairs, 0)
    frac = float(batch["completion_mask"][:, 1:].float().mean())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out = []
    for name, cls, pre in (("dpo", DPO, False), ("dpo", DPO, True), ("simpo", SimPO, False)):
        obj = cls(TrainConfig(objective=name, data="x", out="x"))
        if pre:  # --precompute-ref: the step reads the reference log-probs
            with torch.no_grad():
                ref = obj.reference(model, batch, "train")
            obj.ref["train"] = ref
            batch["pair_index"] = torch.arange(4)

        def step(obj=obj):
            obj.loss(model, batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        measured, _ = peak_allocated(step)
        rows = _planned(model, count, batch_size=4, seq_len=batch["input_ids"].shape[1], label_fraction=frac,
                        objective=name, precompute_ref=pre)
        planned = rows["peak"] - rows["weights"] - rows["optimizer"]
        out.append({"case": f"{name}{' --precompute-ref' if pre else ''}", "pairs": 4,
                    "seq_len": batch["input_ids"].shape[1], "label_fraction": frac, "measured": measured,
                    "planned": planned, "ratio": planned / measured, "rows": rows})
        print(f"{out[-1]['case']}: measured {measured / 2**20:,.0f} MiB, planned {planned / 2**20:,.0f} MiB", flush=True)
    return out


def grpo_cases(model, tok, count) -> list[dict]:
    from lorakit.testing import grpo_phase_peaks
    from lorakit.train.distributed import DistInfo
    from lorakit.train.objectives.grpo import GRPO
    from lorakit.train.objectives.grpo_data import PromptBatches, read_prompts, tokenize_prompts
    from lorakit.train.recipe import load_recipe

    cfg = load_recipe(str(ROOT / "configs" / "demo-grpo.yaml"), {"out": tempfile.mkdtemp()})
    cfg.data = str(ROOT / cfg.data)
    cfg.reward = str(ROOT / cfg.reward)
    obj = GRPO(cfg)
    obj.prepare(model, tok, cfg, DistInfo(), False)
    prompts = tokenize_prompts(read_prompts(Path(cfg.data)), tok, cfg.max_completion_length)
    source = PromptBatches(prompts, cfg.batch_size * cfg.grad_accum // cfg.num_generations, cfg.seed)
    eos = sorted({tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])})
    rollout, training, batches = grpo_phase_peaks(model, obj, source, eos, lr=1e-5)
    width = max(b["input_ids"].shape[1] for b in batches)
    longest = max(len(x) for x in prompts.ids)
    rows = _planned(model, count, batch_size=cfg.batch_size, seq_len=longest + cfg.max_completion_length,
                    objective="grpo", completion_len=cfg.max_completion_length, num_generations=cfg.num_generations,
                    rollout_rows=cfg.rollout_rows, grad_accum=cfg.grad_accum, beta=cfg.beta)
    held = rows["weights"] + rows["optimizer"]
    out = []
    for phase, measured in (("rollout phase", rollout), ("training phase", training)):
        planned = rows[phase] - held
        out.append({"case": f"grpo demo: {phase}", "completions": cfg.batch_size, "seq_len": longest +
                    cfg.max_completion_length, "measured_width": width, "measured": measured, "planned": planned,
                    "ratio": planned / measured, "rows": rows})
        print(f"{out[-1]['case']}: measured {measured / 2**20:,.0f} MiB, planned {planned / 2**20:,.0f} MiB "
              f"(batch width {width})", flush=True)
    return out


def report(cases: list[dict]) -> str:
    lines = ["# `lorakit plan --objective` vs measured (SmolLM2-135M, CPU, fp32, LoRA r=16 all-linear)", "",
             "Measured: the most tensor bytes live at once during one step, counted from its start (torch.profiler "
             "allocation events, `lorakit.testing.peak_allocated`; weights and AdamW state exist before it). "
             "Planned: the plan's peak (GRPO: each phase) minus its weights and optimizer rows. Tolerance "
             f"±{TOLERANCE:.0%} (bench/plan/calibration.py's).", "",
             "| case | measured MiB | planned MiB | planned / measured | activations MiB | logits MiB | "
             "reference MiB | rollouts MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    mib = lambda x: f"{x / 2**20:,.0f}"  # noqa: E731
    for c in cases:
        r = c["rows"]
        lines.append(f"| {c['case']} | {mib(c['measured'])} | {mib(c['planned'])} | {c['ratio']:.3f} | "
                     f"{mib(r['activations'])} | {mib(r['logits'])} | {mib(r.get('reference', 0))} | "
                     f"{mib(r.get('rollouts', 0))} |")
    lines += ["", "Pairs: 4 pairs, a 64-token prompt and completions of 256-208 (chosen) and 240-168 (rejected) "
              "tokens, padded to 320. GRPO: configs/demo-grpo.yaml (2 prompts × 8 completions of 12 tokens, "
              "batch 16, rollout_rows 64, beta 0), the end-of-sequence token suppressed in generation so every "
              "completion is 12 tokens long (the plan's worst case).", "",
              "Reproduce: `python -m bench.plan.objectives`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok, count = _model()
    cases = pair_cases(model, count) + grpo_cases(model, tok, count)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_objectives.json").write_text(json.dumps({"model": MODEL, "cases": cases}, indent=2) + "\n")
    (RESULTS / "plan_objectives.md").write_text(report(cases))
    return 0 if all(abs(c["ratio"] - 1) <= TOLERANCE for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
