"""Evaluation: token-weighted loss, batched greedy generation, exact match on a task split."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batching import collate
from ..data.tokenize import IGNORE_INDEX, TokenizedDataset
from ..errors import DataError
from ..lora.ops import linear_cross_entropy

# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or scaling
# after the head. Tested against the plain path (tests/test_evaluate.py); others take the plain path.
FUSED_CE_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the labelled tokens of a batch, and their count.

    Summing (rather than averaging per batch) lets gradient accumulation and data-parallel
    shards divide by the global token count, so results do not depend on how a batch is split.
    Logits exist only for labelled tokens, and never all at once: for the architectures in
    FUSED_CE_MODELS with a plain output head, the final hidden states of the labelled positions
    go through lorakit.ops.linear_cross_entropy (chunks of logits, gradient taken in the same
    pass). Otherwise transformers' ``logits_to_keep`` limits the logits to the positions any row
    needs (with a 49k vocabulary and loss on the answer alone this skips most of the head's work).
    """
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    labelled = labels != IGNORE_INDEX
    n = int(labelled.sum())
    kwargs = model_inputs(batch)
    head = fused_head(model)
    if head is not None:
        hidden = _final_hidden(model, kwargs)[:, :-1]  # (B, T-1, H)
        return linear_cross_entropy(hidden[labelled], head.weight, labels[labelled]), n
    keep = labelled.any(dim=0).nonzero().squeeze(1)  # (K,) positions any row needs
    if _accepts_logits_to_keep(model) and len(keep) < labels.shape[1]:
        logits = model(**kwargs, logits_to_keep=keep).logits  # (B, K, V)
        labels = labels[:, keep]
    else:
        logits = model(**kwargs).logits[:, :-1]  # (B, T-1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch: padded rows give the 2D attention mask; packed rows
    (with ``position_ids``) give position_ids and no mask, from which transformers builds the
    block-diagonal mask, and no KV cache (an empty cache, made by default, turns that detection off)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def fused_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head when loss_sum may fuse it with the loss: a plain bias-free Linear of a
    FUSED_CE_MODELS architecture, unsharded (FSDP gathers weights only inside module calls)."""
    inner = getattr(model, "module", model)  # DDP wraps the model
    if getattr(getattr(inner, "config", None), "model_type", None) not in FUSED_CE_MODELS:
        return None
    if not (_accepts_logits_to_keep(inner) and hasattr(inner, "get_decoder")):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "device_mesh"):
        return None
    return head


def _final_hidden(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The decoder's last hidden state, from one call of ``model`` itself (so DDP's forward runs),
    asking for logits at no position (an empty index: the head runs on zero rows)."""
    captured = []
    decoder = getattr(model, "module", model).get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, out: captured.append(out))
    none = torch.empty(0, dtype=torch.long, device=kwargs["input_ids"].device)
    try:
        model(**kwargs, logits_to_keep=none)
    finally:
        handle.remove()
    out = captured[-1]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model; its own forward takes *args
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Read once per model class: inspect.signature is too slow for every training step."""
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@torch.no_grad()
def eval_loss(model: torch.nn.Module, dataset: TokenizedDataset, batch_size: int, pad_id: int,
              max_batches: int = 0, info=None) -> float:
    """Mean per-token validation loss over ``dataset`` (in order; optionally the first max_batches).

    Under torchrun each rank takes rows rank::world of every batch and the sums are all-reduced.

    Args:
        model: the model (put in eval mode for the duration).
        dataset: tokenized validation examples.
        batch_size: examples per forward.
        pad_id: padding token id.
        max_batches: 0 for the whole set.
        info: lorakit.distributed.DistInfo, or None for a single process.
    """
    from .distributed import DistInfo, all_sum

    info = info or DistInfo()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(dataset), batch_size))
    if max_batches:
        starts = starts[:max_batches]
    for start in starts:
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))][info.rank::info.world]
        if not rows:  # a short last batch; FSDP still needs this rank in the forward
            rows = [dataset[start]]
            loss, n = loss_sum(model, collate(rows, pad_id))
            loss, n = loss * 0, 0
        else:
            loss, n = loss_sum(model, collate(rows, pad_id))
        total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = all_sum(info, total, count)
    return total / count if count else math.nan


def prompt_and_answer(record: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt text to generate from, reference answer) for a messages or prompt/completion record."""
    if "messages" in record:
        msgs = record["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise DataError("an exact-match example needs messages ending with the assistant's answer")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, msgs[-1]["content"]
    if "prompt" in record and "completion" in record:
        return record["prompt"], record["completion"]
    raise DataError("an exact-match example needs 'messages' or 'prompt'/'completion'")


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 32, progress: bool = False, **gen_kwargs) -> list[str]:
    """Greedy (or sampled, via gen_kwargs) continuations of ``prompts``, batched with left padding.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (pad token required; eos used if missing).
        prompts: prompt strings (already chat-formatted where needed).
        max_new_tokens: continuation length limit.
        batch_size: prompts per generate call.
        progress: show a tqdm bar.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs = {"do_sample": False, **gen_kwargs}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match_score(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                      max_new_tokens: int = 16, batch_size: int = 50, progress: bool = False) -> dict[str, Any]:
    """Greedy exact match (whitespace-stripped) of the model's answers on ``records``.

    Returns:
        {"exact_match": fraction, "n": count, "examples": first few (prompt answer, reference, prediction)}
    """
    pairs = [prompt_and_answer(r, tokenizer) for r in records]
    preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, progress)
    hits = [pred.strip() == ref.strip() for pred, (_, ref) in zip(preds, pairs, strict=True)]
    shown = [{"reference": ref, "prediction": pred} for pred, (_, ref) in list(zip(preds, pairs, strict=True))[:5]]
    return {"exact_match": sum(hits) / len(hits) if hits else math.nan, "n": len(hits), "examples": shown}
