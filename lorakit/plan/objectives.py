"""Memory of the objectives beyond SFT, as lorakit's trainer runs them (``train/objectives/``).

- **dpo, orpo, simpo**: a micro-batch of B pairs is, by ``--pair-layout`` (``data.preference.collate_pairs``),
  2B rows padded to the longest (padded), or one row of the pairs' tokens (packed: each prompt twice; shared:
  each prompt once, lorakit's packed attention). The head scores the completion positions only: with a frozen
  head of the fused families through ``head_logps`` (chunks of fp32 logits; it keeps the hidden-state gradient
  of the scored rows, never the logits), otherwise through ``logits_to_keep`` and a plain log-softmax. DPO adds
  a gradient-free reference forward of the same tokens with the adapters off (``lk.disable_adapters``: no
  second copy of the weights) after the policy's forward, while the policy's activations are alive; it keeps
  nothing, its peak is transient. ``--precompute-ref`` removes it.
- **grpo**: a step has two phases that never overlap. Rollouts: ``generate()`` runs ``rollout_rows`` rows
  at once, each holding a KV cache of its prompt + ``max_completion_length`` tokens, plus one decoding
  step's logits and sampling buffers; then (beta > 0, or num_iterations > 1) a gradient-free forward per
  micro-batch for the reference (or old) log-probs. Training: micro-batches of ``batch_size`` completions,
  each prompt once followed by k of its completions where ``grpo_logps``'s cost model packs them (a frozen
  fused-family head on SDPA), else the padded rows [prompt, completion]. Gradients are freed after each
  optimizer step (``zero_grad(set_to_none=True)``), so rollouts hold weights and optimizer state only. The
  peak is the larger phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..data.preference import CPU_PACK_MULTIPLE
from .arch import Arch
from .inputs import PAIR_OBJECTIVES, PlanInputs, Row, _final_norm, _gib

SCORE_BYTES = 4 + 4  # head_logps per chunk row and vocab entry: fp32 logits + logsumexp's shifted copy


def objective_rows(arch: Arch, inp: PlanInputs, mode: str, held: dict[str, Row], fused: bool, head_grad: float,
                   temp: float, activations: Callable[[PlanInputs], Row]) -> dict[str, Row]:
    """The memory rows of one mode for a pair objective or GRPO (see the module docstring).

    Args:
        arch: the architecture.
        inp: the run (``inp.objective`` is not sft).
        mode: "full", "lora" or "qlora".
        held: the weights, gradients and optimizer rows.
        fused: the head is of a fused family and not adapted (``head_logps`` runs it where it is frozen).
        head_grad: bytes of the head's gradient (full fine-tuning), allocated first in backward.
        temp: the optimizer step's temporaries.
        activations: the activations row of a forward of a given shape (rows × seq_len, padded or not).
    """
    fused = fused and mode != "full"  # a trained head takes the model's own logits
    if inp.objective in PAIR_OBJECTIVES:
        return _pair_rows(arch, inp, mode, held, fused, head_grad, temp, activations)
    return _grpo_rows(arch, inp, mode, held, fused, head_grad, temp, activations)


def score_chunk(positions: int, vocab: int) -> int:
    """Rows of one head_logps chunk (``train/objectives/logps.py``: CHUNK_BYTES of fp32 logits)."""
    from ..train.objectives.logps import CHUNK_BYTES

    return min(positions, max(16, CHUNK_BYTES // (4 * vocab)))


def _shape(inp: PlanInputs, rows: int, seq_len: int, padded: bool) -> PlanInputs:
    """The forward's shape on one device: ``rows`` × ``seq_len`` tokens."""
    return replace(inp, objective="sft", batch_size=rows, nproc=1, seq_len=seq_len, padded=padded)


# ---- transients of a gradient-free forward --------------------------------------------------------------

def inference_per_token(arch: Arch, inp: PlanInputs) -> int:
    """Bytes per token alive inside one block of a gradient-free forward at its fullest: the embeddings (the
    model's forward holds them), the residual and the normed input, the rotary cos and sin, plus the MLP's
    act(gate), up and their product (or the attention's q, k, v, repeated k, v and output)."""
    e, h = inp.e, arch.hidden
    mlp = e * arch.intermediate * (3 if arch.gated else 2)
    kv = arch.heads if inp.padded and arch.kv_heads != arch.heads else arch.kv_heads
    attention = e * (2 * arch.q_dim + 2 * (arch.kv_heads + kv) * arch.head_dim)
    return 3 * e * h + 2 * e * arch.head_dim + max(mlp, attention)


def _forward_transient(arch: Arch, shape: PlanInputs) -> float:
    """A gradient-free forward of ``shape``'s tokens through the blocks, with its mask (a boolean rows × T × T)
    where it has one."""
    mask = shape.rows * shape.seq_len ** 2 if shape.padded else 0
    return shape.tokens * inference_per_token(arch, shape) + mask


# ---- the head -------------------------------------------------------------------------------------------

def _head(arch: Arch, inp: PlanInputs, mode: str, shape: PlanInputs, p: int, fused: bool, head_grad: float,
          where: str) -> tuple[float, float, str]:
    """(bytes kept until backward, transient bytes on top, formula) of the head over P scored positions of
    ``shape``: ``head_logps`` (fused) or the model's logits at those positions in fp32."""
    v, h, e, tokens = arch.vocab, arch.hidden, inp.e, shape.tokens
    norm = _final_norm(arch, inp, mode)
    if fused:
        chunk = score_chunk(p, v)
        kept = p * h * e + norm * tokens
        forward = tokens * h * e + p * h * e + SCORE_BYTES * chunk * v
        transient = max(forward, 2 * tokens * h * e)
        return kept, transient, (
            f"head_logps on P = {p:,} scored positions of {where}: kept P·h·e (the hidden-state gradient) + final "
            f"norm {norm} B/token = {_gib(kept)}; transient max(forward: final hidden states {tokens:,} × h·e + the "
            f"scored rows P·h·e + one chunk of {chunk:,} rows × V × {SCORE_BYTES} B, backward: 2 × {tokens:,} × h·e) = "
            f"{_gib(transient)}")
    head_in = e * h * p if mode == "full" else 0
    kept = 4 * p * v + norm * tokens + head_in
    transient = 8 * p * v + head_grad
    return kept, transient, (
        f"12·P·V (fp32 log-probs kept for the loss, their gradient, the logits gradient) with P = {p:,} scored "
        f"positions of {where}, V = {v:,}; + final norm {norm} B/token" + (" + head input P·h·e" if head_in else ""))


def _reference(arch: Arch, inp: PlanInputs, shape: PlanInputs, p: int, fused: bool) -> tuple[float, str]:
    """A gradient-free forward of ``shape`` scoring P positions: its largest transient and the formula."""
    blocks = _forward_transient(arch, shape)
    v, h, e = arch.vocab, arch.hidden, inp.e
    head = (shape.tokens * h * e + p * h * e + SCORE_BYTES * score_chunk(p, v) * v if fused
            else (e + 8) * p * v)
    return max(blocks, head), (f"max(a block: {shape.tokens:,} tokens × {inference_per_token(arch, shape)} B"
                               + (" + the boolean mask rows·T·T" if shape.padded else "")
                               + f" = {_gib(blocks)}, the head = {_gib(head)})")


# ---- dpo, orpo, simpo -----------------------------------------------------------------------------------

def pair_shape(inp: PlanInputs) -> tuple[PlanInputs, str]:
    """The forward of a micro-batch of pairs on one device, by ``--pair-layout`` (``data.preference.collate_pairs``)."""
    b, t = -(-inp.batch_size // inp.nproc), inp.seq_len
    if inp.pair_layout == "padded":
        return _shape(inp, 2 * b, t, True), f"2B = {2 * b} rows (chosen, rejected) × T = {t}"
    q = CPU_PACK_MULTIPLE if inp.device == "cpu" else 0  # the trainer rounds a packed row up on CPU
    rounded = f", rounded up to a multiple of {q}" if q else ""
    if inp.pair_layout == "shared" and inp.prompt_len:
        n = b * (2 * t - inp.prompt_len)
        return _shape(inp, 1, _round_up(n, q), False), \
            f"one row of B·(2T − prompt) = {n:,} tokens{rounded} (layout shared)"
    n = 2 * b * t
    return _shape(inp, 1, _round_up(n, q), False), \
        f"one row of at most 2B·T = {n:,} tokens{rounded} (layout {inp.pair_layout})"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple else n


def _pair_rows(arch: Arch, inp: PlanInputs, mode: str, held: dict[str, Row], fused: bool, head_grad: float,
               temp: float, activations: Callable[[PlanInputs], Row]) -> dict[str, Row]:
    weights, grads, optim = held["weights"], held["gradients"], held["optimizer"]
    shape, where = pair_shape(inp)
    acts = activations(shape)
    p = inp.logit_positions  # the completion positions of 2B rows, whatever the layout
    kept, transient, formula = _head(arch, inp, mode, shape, p, fused, head_grad, where)
    rows = {"weights": weights, "gradients": grads, "optimizer": optim,
            "activations": Row(acts.bytes, f"{acts.formula}; the forward: {where}"),
            "logits": Row(kept + transient, formula)}
    ref = 0.0
    if inp.objective == "dpo" and not inp.precompute_ref:
        ref, how = _reference(arch, inp, shape, p, fused)
        rows["reference"] = Row(ref, f"DPO's reference: a gradient-free forward of the same tokens with the adapters "
                                     f"off, while the policy's activations are kept: {how}; nothing copied, "
                                     f"nothing kept")
    elif inp.objective == "dpo":
        rows["reference"] = Row(0, "--precompute-ref: the reference log-probs were computed once before training")
    start = acts.bytes + kept + max(transient, ref)
    end = grads.bytes + temp
    rows["peak"] = Row(weights.bytes + optim.bytes + max(start, end),
                       f"weights + optimizer + max(step = activations + kept logits + max(head transient, "
                       f"reference forward) = {_gib(start)}, optimizer step = gradients + AdamW temporaries = "
                       f"{_gib(end)})")
    return rows


# ---- grpo -----------------------------------------------------------------------------------------------

def rollout_rows_in_flight(inp: PlanInputs) -> int:
    """Rows the generation core runs at once: rollout_rows, or a step's completions on this device if fewer."""
    return min(inp.rollout_rows, -(-inp.batch_size // inp.nproc) * inp.grad_accum)


def kv_cache_bytes(arch: Arch, inp: PlanInputs, rows: int, seq: int) -> float:
    """Keys and values of every layer for ``rows`` × ``seq`` tokens, in the model dtype."""
    return rows * seq * arch.layers * 2 * arch.kv_heads * arch.head_dim * inp.e


def grpo_shape(arch: Arch, inp: PlanInputs, fused: bool) -> tuple[PlanInputs, str]:
    """The training forward of a micro-batch of completions (``train/objectives/grpo_logps.py``): with a frozen
    fused-family head on SDPA, each prompt once followed by k of its completions (k by its cost model), else
    the padded rows [prompt, completion]."""
    from ..train.objectives.grpo_logps import completions_per_row

    b, c, t = inp.rows, inp.completion_len, inp.seq_len
    prompt = t - c
    padded = _shape(inp, b, t, True), f"{b} rows [prompt, completion] × {t} tokens"
    if not fused:
        return padded
    sizes = [min(inp.num_generations, b - s) for s in range(0, b, inp.num_generations)]  # a micro-batch's groups
    groups, at = [], 0
    for n in sizes:
        groups.append(list(range(at, at + n)))
        at += n
    k = completions_per_row(groups, [prompt] * b, c, arch.hidden)
    if k == 1:
        return padded
    rows = sum(-(-n // k) for n in sizes)
    width = prompt + min(k, max(sizes)) * c
    return _shape(inp, rows, width, True), (f"{rows} rows [prompt, {k} completions] × {width} tokens (each prompt "
                                            f"once for k = {k} of its completions, a 4-D mask)")


def _grpo_rows(arch: Arch, inp: PlanInputs, mode: str, held: dict[str, Row], fused: bool, head_grad: float,
               temp: float, activations: Callable[[PlanInputs], Row]) -> dict[str, Row]:
    weights, grads, optim = held["weights"], held["gradients"], held["optimizer"]
    e, v, c, t = inp.e, arch.vocab, inp.completion_len, inp.seq_len
    p = inp.logit_positions  # every completion token of the micro-batch
    shape, where = grpo_shape(arch, inp, fused)
    acts = activations(shape)
    kept, transient, formula = _head(arch, inp, mode, shape, p, fused, head_grad, where)
    # generation: the cache of the rows in flight; a decoding step adds a copy of one layer's keys (or values:
    # DynamicCache concatenates them in turn) and its logits: the model-dtype output, fp32 copy, scaled copy,
    # softmax and cumulative sum
    r = rollout_rows_in_flight(inp)
    cache = kv_cache_bytes(arch, inp, r, t)
    step = cache / (2 * arch.layers) + r * v * (e + 12)
    # prefill, before any completion token: the G completions of a prompt prefill it once (prefix sharing),
    # then their cache rows are copies of the prompt's
    prompts = -(-r // inp.num_generations)
    prefill = kv_cache_bytes(arch, inp, r + prompts, t - c) + _forward_transient(arch, _shape(inp, prompts, t - c,
                                                                                              True))
    generation = max(cache + step, prefill)
    rows = {"weights": weights, "gradients": grads, "optimizer": optim,
            "activations": Row(acts.bytes, f"{acts.formula}; the training forward: {where}"),
            "logits": Row(kept + transient, formula),
            "rollouts": Row(generation,
                            f"{r} rows in flight (rollout_rows, or a step's completions if fewer) × (prompt + "
                            f"max_completion_length = {t}) tokens of KV cache, L·2·kv_heads·head_dim·e = "
                            f"{arch.layers * 2 * arch.kv_heads * arch.head_dim * e:,} B per token = {_gib(cache)}, + a decoding "
                            f"step's copy of one layer's keys and {r} × V × {e + 12} B of logits and sampling = "
                            f"{_gib(cache + step)}; or, if larger, the prefill of {prompts} prompts × {t - c} tokens "
                            f"with their cache = {_gib(prefill)}")}
    ref = 0.0
    if inp.beta > 0 or inp.num_iterations > 1:
        ref, how = _reference(arch, inp, shape, p, fused)
        why = " and ".join(x for x, on in (("reference (beta > 0, adapters off)", inp.beta > 0),
                                           ("old (num_iterations > 1)", inp.num_iterations > 1)) if on)
        rows["reference"] = Row(ref, f"{why} log-probs after generation, gradient-free, one micro-batch at a time: "
                                     f"{how}; nothing kept but (B, C) fp32 log-probs")
    rollout = weights.bytes + optim.bytes + max(generation, ref)
    start = acts.bytes + kept + transient
    training = weights.bytes + optim.bytes + max(start, grads.bytes + temp)
    rows["rollout phase"] = Row(rollout, f"weights + optimizer + max(generation {_gib(generation)}, reference "
                                         f"forward {_gib(ref)}); no gradients (freed after each step)")
    rows["training phase"] = Row(training, f"weights + optimizer + max(backward start = activations + logits = "
                                           f"{_gib(start)}, optimizer step = gradients + AdamW temporaries = "
                                           f"{_gib(grads.bytes + temp)})")
    rows["peak"] = Row(max(rollout, training), "max(rollout phase, training phase): they take turns")
    return rows
