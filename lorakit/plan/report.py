"""`lorakit plan` as a document: the memory table, FLOPs, time and cost per GPU, and the assumptions.

``build_plan`` assembles the ``--json`` document from :mod:`lorakit.plan` (memory) and
:mod:`lorakit.gpus` (FLOPs, GPUs); ``format_plan`` prints it, with each row's formula under ``--explain``.
"""

from __future__ import annotations

from torch import nn

from .arch import read_arch
from .count import CountReport
from .gpus import CUDA_OVERHEAD_GIB, GPU, fits, run_cost, training_flops
from .inputs import MODES, PlanInputs
from .memory import plan_memory

ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
        ("activations", "activations"), ("logits", "logits / loss"), ("reference", "reference fwd"),
        ("rollouts", "rollouts (KV)"), ("rollout phase", "rollout phase"), ("training phase", "training phase"),
        ("peak", "peak total"))  # the objective's rows (reference, rollouts, phases) only where it has them
TITLES = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA (4-bit)"}
CHECKPOINT_FLAG = "--gradient-checkpointing"  # the flag of `lorakit train` and `lorakit plan` alike


def assumptions(inputs: PlanInputs) -> list[str]:
    """What the plan takes for granted about the run, written from the code it models, so it cannot drift:
    the fused-head families from ``evaluate.FUSED_CE_MODELS``, the chunk size from ``ops.CHUNK_BYTES``,
    the checkpointing note from ``inputs`` (the trainer's ``--gradient-checkpointing``)."""
    from ..lora.ops import CHUNK_BYTES
    from ..train.evaluate import FUSED_CE_MODELS

    families = "/".join(sorted(FUSED_CE_MODELS))
    if inputs.grad_checkpointing:
        checkpointing = (f"gradient checkpointing as lorakit train {CHECKPOINT_FLAG} runs it: each decoder block "
                         "keeps only its input and is recomputed in backward (non-reentrant), one block at a time")
    else:
        checkpointing = (f"no gradient checkpointing: every block keeps its activations (lorakit train and plan "
                         f"take {CHECKPOINT_FLAG} to keep only each block's input)")
    return [
        "training as lorakit's trainer runs it: weights, gradients and optimizer state in the model dtype "
        "(no fp32 master copy); adapter weights, gradients and AdamW state in fp32",
        f"logits only for labelled tokens, loss in fp32; {families} heads fused with the loss "
        f"(one {CHUNK_BYTES / 2**20:g} MiB chunk of logits at a time), other heads through logits_to_keep",
        "attention through PyTorch SDPA (no T×T matrix kept); a padded batch adds a B×T×T mask per layer and "
        "repeats k, v to every head",
        _qlora_line(inputs),
        checkpointing,
        f"fits: peak + {CUDA_OVERHEAD_GIB:g} GiB (CUDA context, allocator slack) <= the card's memory",
        "FLOPs: full 6N, LoRA 4N + 6·N_lora, plus attention; time = tokens × FLOPs / (peak × MFU); QLoRA's "
        "dequantization overhead is not counted; prices are on-demand guesses per GPU-hour (override: --price)",
        *_objective_lines(inputs),
    ]


def _objective_lines(inputs: PlanInputs) -> list[str]:
    """What the objective's plan takes for granted (lorakit.plan.objectives)."""
    if inputs.objective in ("dpo", "orpo", "simpo"):
        ref = ("" if inputs.objective != "dpo" else
               "; the reference log-probs precomputed (--precompute-ref): no reference forward" if inputs.precompute_ref
               else "; DPO's reference: a gradient-free forward of the same rows with the adapters off, after the "
                    "policy's forward (its activations alive); nothing copied, nothing kept")
        layout = {"padded": "2 × batch rows (chosen, rejected) padded to seq_len",
                  "packed": "one row of the pairs' tokens, each prompt twice, no padding (at most 2 × batch × seq_len)",
                  "shared": "one row, each prompt once for both completions (lorakit's packed attention; planned as "
                            "packed without --prompt-len)"}[inputs.pair_layout]
        return [f"{inputs.objective}: batch size counts pairs; a micro-batch is {layout} (--pair-layout "
                f"{inputs.pair_layout}); the head scores completion positions only (label fraction), in chunks{ref}"]
    if inputs.objective == "grpo":
        return ["grpo: batch size counts completions, seq_len is the longest prompt + max_completion_length; two "
                "phases take turns: rollouts (weights + optimizer state + the KV cache of the rows in flight, "
                "then the reference/old log-prob forwards) and training (activations and head of one micro-batch "
                "of completions, each prompt once for k of them where the trainer packs them, on SDPA); the peak "
                "is the larger; FLOPs and time count training only (no generation)"]
    return []


FIT_SEQ_LENS = (512, 1024, 2048, 4096)
FIT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def quant_title(inputs: PlanInputs) -> str:
    return "LoRA + int8" if inputs.quantize == "int8" else f"QLoRA ({inputs.quantize})"


def _qlora_line(inputs: PlanInputs) -> str:
    scales = ("" if inputs.quantize == "int8" else
              " with double-quantized scales" if inputs.double_quant else " with fp32 scales")
    return (f"{quant_title(inputs)} column: what `lorakit train --quantize {inputs.quantize}` runs: every Linear but "
            f"the output head in {inputs.quantize}{scales} (bitsandbytes), computing in the model dtype")


def fit_grid(arch, count: CountReport, inputs: PlanInputs, gpus: list[GPU], lora_dropout: float = 0.0) -> dict:
    """{gpu: {seq_len: the largest batch (of FIT_BATCHES) whose quantized-base peak fits, 0 if none}}."""
    from dataclasses import replace

    grid: dict[str, dict[int, int]] = {g.name: {} for g in gpus}
    for seq in FIT_SEQ_LENS:
        peaks = {b: plan_memory(arch, count, replace(inputs, batch_size=b, seq_len=seq), lora_dropout).total("qlora")
                 for b in FIT_BATCHES}
        for g in gpus:
            grid[g.name][seq] = max((b for b, peak in peaks.items() if fits(peak, g)), default=0)
    return grid


def build_plan(model: nn.Module, count: CountReport, inputs: PlanInputs, gpus: list[GPU], tokens: float,
               mfu: float, lora_dropout: float = 0.0, grid: bool = False) -> dict:
    """The whole plan as a JSON-ready dict.

    Args:
        model: the model on the meta device (:func:`lorakit.count.meta_model`).
        count: :func:`lorakit.count.count_model` of the same model and LoRA config.
        inputs: batch, sequence, dtype, optimizer, checkpointing.
        gpus: the GPUs to price (:func:`lorakit.gpus.select_gpus`).
        tokens: tokens to train on (time and cost).
        mfu: assumed model FLOPs utilisation.
        lora_dropout: the LoRA dropout of the config.
        grid: add "fit": per GPU, the largest batch whose quantized-base run fits at each of FIT_SEQ_LENS.
    """
    arch = read_arch(model)
    memory = plan_memory(arch, count, inputs, lora_dropout)
    flops = training_flops(arch, count.trainable, inputs.seq_len, inputs.label_fraction)
    per_token = {"full": flops.full, "lora": flops.lora, "qlora": flops.lora}
    return {
        "arch": {k: getattr(arch, k) for k in ("params", "layers", "hidden", "intermediate", "heads", "kv_heads",
                                               "head_dim", "vocab")},
        "inputs": dict(vars(inputs)),
        "lora": {"trainable": count.trainable, "modules": len(count.targets), "percent": count.percent},
        "memory": {mode: {row: memory.rows[row][mode].bytes for row, _ in ROWS if row in memory.rows}
                   for mode in MODES},
        "ratio": {mode: memory.ratio(mode) for mode in MODES},
        "formulas": {row: {mode: memory.rows[row][mode].formula for mode in MODES} for row, _ in ROWS
                     if row in memory.rows},
        "flops_per_token": per_token,
        "matmul_params": flops.matmul_params,
        "tokens": tokens,
        "mfu": mfu,
        "gpus": [_gpu_entry(g, memory, per_token, tokens, inputs.dtype, mfu) for g in gpus],
        "assumptions": assumptions(inputs),
        "titles": {**TITLES, "qlora": quant_title(inputs)},
        **({"fit": fit_grid(arch, count, inputs, gpus, lora_dropout)} if grid else {}),
    }


def _gpu_entry(gpu: GPU, memory, per_token: dict, tokens: float, dtype: str, mfu: float) -> dict:
    modes = {}
    for mode in MODES:
        compute = "bfloat16" if mode == "qlora" and dtype == "float32" else dtype
        cost = run_cost(per_token[mode], tokens, gpu, compute, mfu)
        n = memory.inputs.nproc  # n devices share the tokens: the wall time divides, the GPU-hours do not
        modes[mode] = {"fits": fits(memory.total(mode), gpu), "hours": cost["hours"] / n, "cost_usd": cost["cost_usd"]}
    return {"name": gpu.name, "memory_gib": gpu.memory_gib, "tflops": gpu.tflops(dtype),
            "price_per_hour": gpu.price_per_hour, "note": gpu.note, "modes": modes}


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def format_plan(doc: dict, title: str = "", explain: bool = False) -> str:
    """The ``lorakit plan`` text: memory table, FLOPs, GPUs, assumptions (formulas with ``explain``)."""
    a, i, lo, titles = doc["arch"], doc["inputs"], doc["lora"], doc["titles"]
    arch = (f"{a['params']:,} parameters, {a['layers']} blocks, h={a['hidden']}, ffn={a['intermediate']}, "
            f"heads={a['heads']}/{a['kv_heads']} (q/kv), vocab={a['vocab']:,}")
    lines = [f"{title}: {arch}" if title else arch,
             f"LoRA: {lo['trainable']:,} trainable in {lo['modules']} modules ({lo['percent']:.4f}%)",
             f"batch {i['batch_size']} x seq {i['seq_len']}, {i['dtype']}, {i['optimizer']}, gradient "
             f"checkpointing {'on' if i['grad_checkpointing'] else 'off'}, labelled share {i['label_fraction']:g}, "
             f"{'padded' if i['padded'] else 'unpadded'} batches{_objective_title(i)}"
             + (f"; {i['nproc']} devices ({'FSDP' if i['fsdp'] else 'DDP'}): memory per device, "
                f"{-(-i['batch_size'] // i['nproc'])} rows each, hours are wall time" if i["nproc"] > 1 else ""), ""]
    lines.append(f"{'memory (GiB)':<20}" + "".join(f"{titles[m]:>16}" for m in MODES))
    for row, label in ROWS:
        if row not in doc["memory"]["lora"]:
            continue
        lines.append(f"{label:<20}" + "".join(f"{_gib(doc['memory'][m][row]):>16}" for m in MODES))
        if explain:
            lines += [f"    {titles[m]}: {doc['formulas'][row][m]}" for m in MODES]
    lines.append(f"{'ratio to full FT':<20}" + "".join(f"{doc['ratio'][m]:>16.3f}" for m in MODES))
    f = doc["flops_per_token"]
    lines += ["", f"FLOPs per token: full FT {f['full']:.3g}, LoRA {f['lora']:.3g} (N = {doc['matmul_params']:,.0f} "
              f"matmul weights, N_lora = {lo['trainable']:,})"]
    if explain:
        lines.append("    full = 6N + attention; LoRA = 4N + 6·N_lora + attention (no weight gradient for frozen "
                     "weights); attention = 12·layers·q_dim·keys, keys = T/2 when causal")
    lines += ["", f"{doc['tokens']:,.0f} tokens at MFU {doc['mfu']:g}: hours / USD, and whether the peak fits",
              f"{'GPU':<10} {'GiB':>6} {'TFLOP/s':>8} {'$/h':>5}" + "".join(f"  {titles[m]:>24}" for m in MODES)]
    for g in doc["gpus"]:
        cells = "".join(f"  {_gpu_cell(g['modes'][m]):>24}" for m in MODES)
        lines.append(f"{g['name']:<10} {g['memory_gib']:>6.1f} {g['tflops']:>8.1f} {g['price_per_hour']:>5.2f}{cells}")
    if "fit" in doc:
        lines += ["", f"{titles['qlora']}: the largest batch that fits, by sequence length (0: not even batch 1; "
                  f"gradient checkpointing {'on' if i['grad_checkpointing'] else 'off'})",
                  f"{'GPU':<10} {'GiB':>6}" + "".join(f"{'T=' + str(t):>9}" for t in FIT_SEQ_LENS)]
        for g in doc["gpus"]:
            row = doc["fit"][g["name"]]
            lines.append(f"{g['name']:<10} {g['memory_gib']:>6.1f}"
                         + "".join(f"{row.get(t, row.get(str(t), 0)):>9}" for t in FIT_SEQ_LENS))
    lines += ["", "assumptions:"] + [f"  - {x}" for x in doc["assumptions"]]
    return "\n".join(lines)


def _objective_title(i: dict) -> str:
    """The objective's part of the run line (nothing for SFT)."""
    objective = i.get("objective", "sft")
    if objective in ("dpo", "orpo", "simpo"):
        ref = " (reference precomputed)" if objective == "dpo" and i["precompute_ref"] else ""
        return f"; objective {objective}{ref}: {i['batch_size']} pairs = {2 * i['batch_size']} rows per micro-batch"
    if objective == "grpo":
        return (f"; objective grpo: {i['batch_size']} completions per micro-batch of prompt + "
                f"{i['completion_len']} completion tokens, {i['num_generations']} per prompt, rollout_rows "
                f"{i['rollout_rows']}, grad_accum {i['grad_accum']}, beta {i['beta']:g}")
    return ""


def _gpu_cell(m: dict) -> str:
    verdict = "fits" if m["fits"] else "OOM"
    cost = f"{m['cost_usd']:,.2f}" if m["cost_usd"] < 100 else f"{m['cost_usd']:,.0f}"
    return f"{verdict} {m['hours']:,.1f} h ${cost}"
