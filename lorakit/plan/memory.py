"""Memory and FLOP budgets of a training run before it starts: full fine-tuning vs LoRA vs LoRA on a 4-bit base.

Every number comes from the architecture (a model built on the meta device) and the LoRA targets that
``plan_injection`` picks, and models what lorakit's trainer does:

- parameters, gradients and AdamW state stay in the model dtype (no fp32 master copy); LoRA weights,
  their gradients and their AdamW state are fp32 (``LoraLinear`` creates them so);
- logits are computed only at positions that predict a labelled token and the loss is taken in fp32:
  for the architectures of ``evaluate.FUSED_CE_MODELS`` with a plain head, fused with the head in
  chunks (``ops.linear_cross_entropy``: one chunk of logits at a time, the hidden-state gradient
  kept), otherwise as whole logits (``logits_to_keep``);
- RMSNorm and the gated SiLU MLP of Llama-family blocks keep what ``models.lean`` keeps (the norm's input as it
  came instead of an fp32 copy, gate and up without silu(gate)): the trainer runs them so;
- attention is PyTorch SDPA as transformers calls it: q, k, v, output and log-sum-exp are kept, never
  the T×T matrix; a padded batch adds one additive B×T×T mask per layer and k, v repeated to all heads;
- the peak is reached either when backward starts (every activation alive, logits gradient being
  formed) or during the optimizer step (weights + gradients + states + AdamW temporaries).

``plan_memory`` returns each row with the formula that produced it (``lorakit plan --explain``).
"""

from __future__ import annotations

from ..lora.inject import Target
from .arch import Arch
from .count import CountReport
from .inputs import MODES, OPTIMIZERS, MemoryPlan, PlanInputs, Row, _final_norm, _gib, rms_norm_bytes

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 256 blocks


def quant_bytes(method: str = "nf4", double_quant: bool = True, in_features: int = 4096) -> float:
    """Bytes per weight of a quantized Linear as bitsandbytes stores it (what ``lorakit.quantize`` makes).

    4-bit (nf4, fp4): half a byte of code plus one absmax per block of 64, an fp32 one, or with double
    quantization an 8-bit one plus an fp32 scale per 256 blocks. int8 (LLM.int8()): one byte plus an
    fp32 scale per output row (4 / in_features per weight).
    """
    if method == "int8":
        return 1 + 4 / in_features
    return NF4_BYTES if double_quant else 0.5 + 4 / 64
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value",
            "wqkv", "Wqkv", "in_proj", "q", "k", "v"}


# ---- activations ----------------------------------------------------------------------------------

def layer_terms(arch: Arch, inp: PlanInputs, mode: str, lora: list[Target] | None = None,
                lora_dropout: float = 0.0) -> dict[str, float]:
    """Bytes saved for backward per token in one block, by component (see the module docstring).

    Args:
        arch: the architecture.
        inp: dtype, padding, sequence length.
        mode: "full" (every weight trainable) or "lora"/"qlora" (frozen base, adapters on ``lora``).
        lora: the adapted modules of this block (see :func:`block_targets`).
        lora_dropout: LoRA dropout (> 0 keeps a one-byte mask per distinct adapted input).
    """
    e, h, inter, frozen = inp.e, arch.hidden, arch.intermediate, mode != "full"
    t: dict[str, float] = {}
    t["norms"] = 2 * rms_norm_bytes(arch, inp, mode)
    kv = arch.heads if inp.padded and arch.kv_heads != arch.heads else arch.kv_heads
    t["attention"] = e * (2 * arch.q_dim + 2 * kv * arch.head_dim) + 4 * arch.heads
    if inp.padded:
        t["attention mask"] = e * inp.seq_len
    # act's input (+ for a gated MLP act's output and up; the trainer's lean SiLU MLP recomputes act's output)
    t["mlp"] = e * inter * ((2 if arch.lean_mlp else 3) if arch.gated else 1)
    if arch.dropout:
        t["dropout masks"] = 2 * h
    if not frozen:
        t["linear inputs"] = e * (2 * h + inter)  # attention in, MLP in, MLP out (o_proj's is the SDPA output)
        return t
    t["lora inputs"] = _lora_inputs(arch, inp, lora or [], lora_dropout)
    return t


def _lora_inputs(arch: Arch, inp: PlanInputs, lora: list[Target], dropout: float) -> float:
    """What adapted Linears keep (lorakit.ops.lora_down): each distinct input once, as it came (o_proj's
    is SDPA's own output), a one-byte dropout mask per distinct input, and A·x (fp32) for B per module."""
    dims = {"attn_in": arch.hidden, "attn_out": arch.q_dim, "mlp_in": arch.hidden, "mlp_out": arch.intermediate}
    roles = {_role(t, arch) for t in lora}
    inputs = sum(inp.e * dims[r] for r in roles if r != "attn_out")
    masks = sum(dims[r] for r in roles) if dropout > 0 else 0
    return sum(4 * t.r for t in lora) + inputs + masks


def _role(t: Target, arch: Arch) -> str:
    leaf = t.name.rsplit(".", 1)[-1]
    if "attn" in t.name or "attention" in t.name:
        return "attn_in" if leaf in _ATTN_IN else "attn_out"
    return "mlp_out" if t.shape[1] == arch.intermediate else "mlp_in"


def block_targets(arch: Arch, targets: list[Target]) -> dict[int, list[Target]]:
    """Adapted modules by block index (-1: outside the blocks, e.g. embeddings or the head)."""
    out: dict[int, list[Target]] = {}
    prefix = arch.layers_path + "."
    for t in targets:
        idx = -1
        if t.name.startswith(prefix):
            idx = int(t.name[len(prefix):].split(".", 1)[0])
        out.setdefault(idx, []).append(t)
    return out


# ---- the memory table -----------------------------------------------------------------------------

def plan_memory(arch: Arch, count: CountReport, inp: PlanInputs, lora_dropout: float = 0.0) -> MemoryPlan:
    """Peak training memory of full fine-tuning, LoRA and LoRA on a 4-bit base, row by row.

    Args:
        arch: :func:`lorakit.plan.arch.read_arch` of the model.
        count: the LoRA count of the same model (its targets decide LoRA's activations).
        inp: batch, sequence, dtype, optimizer, checkpointing.
        lora_dropout: the LoRA dropout (a one-byte mask of each distinct adapted input is kept).
    """
    plan = MemoryPlan(inp, arch, count.trainable)
    for mode in MODES:
        for name, row in _mode_rows(arch, count, inp, mode, lora_dropout).items():
            plan.rows.setdefault(name, {})[mode] = row
    return plan


def _mode_rows(arch: Arch, count: CountReport, inp: PlanInputs, mode: str, dropout: float) -> dict[str, Row]:
    e, n, lora = inp.e, arch.params, count.trainable
    states = OPTIMIZERS[inp.optimizer]
    if mode == "full":
        weights = Row(n * e, f"N·e = {n:,} × {e} B")
        grads = Row(n * e, f"N·e = {n:,} × {e} B (gradients in the model dtype)")
        optim = Row(states * n * e, f"{states}·N·e ({inp.optimizer}: {states} state tensor(s) per weight)")
        largest, trainable_bytes, head_grad = arch.largest * e, n * e, arch.head * e
    else:
        if mode == "lora":
            weights = Row(n * e + 4 * lora, f"N·e + 4·N_lora = {n:,} × {e} B + {lora:,} × 4 B (adapters fp32)")
        else:
            rest, q = n - arch.quantizable, quant_bytes(inp.quantize, inp.double_quant, arch.hidden)
            scales = "" if inp.quantize == "int8" else (", double-quantized scales" if inp.double_quant else
                                                       ", fp32 scales")
            weights = Row(arch.quantizable * q + rest * e + 4 * lora,
                          f"N_linear·{q:.4f} + N_rest·e + 4·N_lora = {arch.quantizable:,} × {8 * q:.3f} bit "
                          f"+ {rest:,} × {e} B + {lora:,} × 4 B ({inp.quantize}{scales})")
        grads = Row(4 * lora, f"4·N_lora = {lora:,} × 4 B")
        optim = Row(4 * states * lora, f"{states}·4·N_lora ({inp.optimizer} state in fp32)")
        largest = 4 * max((max(t.shape) * t.r for t in count.targets), default=0)
        trainable_bytes, head_grad = 4 * lora, 0
    weights, grads, optim = _distribute(arch, inp, weights, grads, optim)
    if inp.fsdp:  # the optimizer step works on this device's shards only
        trainable_bytes, largest = trainable_bytes / inp.nproc, largest / inp.nproc
    acts = _activations(arch, count, inp, mode, dropout)
    fused = arch.fused_loss and (mode == "full" or all(t.name != arch.head_name for t in count.targets))
    temp = 0 if states == 0 else (trainable_bytes if inp.device == "cuda" else 2 * largest)
    if inp.objective != "sft":
        from .objectives import objective_rows

        held = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts}
        return objective_rows(arch, inp, mode, held, fused, head_grad, temp,
                              lambda shape: _activations(arch, count, shape, mode, dropout))
    logits = _fused_logits(arch, inp, mode) if fused else _logits(arch, inp, mode)
    # fused: the loss's transients are inside the logits row; plain: backward starts with the logits gradient
    start = acts.bytes + (logits.bytes + head_grad if fused else
                          max(logits.bytes, 4 * inp.logit_positions * arch.vocab + head_grad))
    end = grads.bytes + temp
    backward = ("activations + logits + head gradient" if fused else
                "activations + max(logits, 4·P·V + head gradient")
    peak = Row(weights.bytes + optim.bytes + max(start, end),
               f"weights + optimizer + max(backward start = {backward} {_gib(head_grad)}"
               f"{'' if fused else ')'} = {_gib(start)}, optimizer step = gradients + AdamW temporaries "
               f"{_gib(temp)} = {_gib(end)})")
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts,
            "logits": logits, "peak": peak}


def _distribute(arch: Arch, inp: PlanInputs, weights: Row, grads: Row, optim: Row) -> tuple[Row, Row, Row]:
    """Per-device weights, gradients and optimizer state under DDP or FSDP (unchanged for one process)."""
    n = inp.nproc
    if n == 1:
        return weights, grads, optim
    if not inp.fsdp:
        return weights, Row(2 * grads.bytes, f"2 × ({grads.formula}): DDP's gradient buckets copy them"), optim
    block = (arch.params - arch.head) / arch.layers * inp.e
    return (Row(weights.bytes / n + block, f"({weights.formula}) / {n} devices + one block gathered whole "
                f"({block / 2**20:,.0f} MiB)"),
            Row(grads.bytes / n, f"({grads.formula}) / {n} devices"),
            Row(optim.bytes / n, f"({optim.formula}) / {n} devices"))


def _activations(arch: Arch, count: CountReport, inp: PlanInputs, mode: str, dropout: float) -> Row:
    by_block = block_targets(arch, count.targets)
    if mode == "full":
        first = 0
    elif any(t.kind == "embedding" for t in by_block.get(-1, [])):
        first = 0
    else:
        first = min((i for i in by_block if i >= 0), default=arch.layers)
    per_block = [sum(layer_terms(arch, inp, mode, by_block.get(i, []), dropout).values())
                 for i in range(first, arch.layers)]
    active = len(per_block)
    terms = layer_terms(arch, inp, mode, by_block.get(first, []), dropout) if active else {}
    detail = " + ".join(f"{k} {v:,.0f}" for k, v in terms.items())
    if not active:
        return Row(0, "no block before the adapted modules needs gradients: nothing is kept")
    if inp.grad_checkpointing:
        stored = active * inp.e * arch.hidden * inp.tokens
        return Row(stored + max(per_block) * inp.tokens,
                   f"checkpointed: {active} blocks × B·T·h·e = {_gib(stored)}, plus one block recomputed in "
                   f"backward: B·T × ({detail}) B")
    skipped = f"; blocks 0..{first - 1} keep nothing (no adapter below them)" if first else ""
    return Row(sum(per_block) * inp.tokens,
               f"{active} blocks × B·T = {inp.tokens:,} tokens × ({detail}) B per token{skipped}")


def _fused_logits(arch: Arch, inp: PlanInputs, mode: str) -> Row:
    from ..lora.ops import CHUNK_BYTES

    p, v, h, e = inp.logit_positions, arch.vocab, arch.hidden, inp.e
    chunk = min(p, max(16, CHUNK_BYTES // (4 * v)))
    per_chunk = chunk * v * (4 + (e if e != 4 else 0))  # fp32 logits → softmax in place, cast to the head dtype
    head_grad = 4 * v * h if mode == "full" else 0  # the head's gradient, accumulated in fp32 during the pass
    norm = _final_norm(arch, inp, mode)
    return Row(p * h * e + per_chunk + head_grad + norm * inp.tokens,
               f"fused head + loss: P·h·e hidden-state gradient + {chunk:,} rows × V × {per_chunk // (chunk * v)} B "
               f"(one chunk of logits) with P = {p:,} labelled positions, V = {v:,}"
               + (" + 4·V·h head gradient (fp32)" if head_grad else "") + f"; + final norm B·T·{norm} B")


def _logits(arch: Arch, inp: PlanInputs, mode: str) -> Row:
    norm = _final_norm(arch, inp, mode)
    head_in = inp.e * arch.hidden * inp.logit_positions if mode == "full" else 0
    p, v = inp.logit_positions, arch.vocab
    return Row(12 * p * v + norm * inp.tokens + head_in,
               f"12·P·V (fp32 log-probs kept for the loss, their gradient, the logits gradient) with "
               f"P = {p:,} labelled positions, V = {v:,}; + final norm B·T·{norm} B"
               + (" + head input P·h·e" if head_in else ""))
