"""``generate``: n completions per prompt, in process, through the continuous-batching core.

    groups = generate(model, tokenizer, ["2 + 2 =", [{"role": "user", "content": "hi"}]], n=4,
                      sampling=SamplingParams(max_tokens=64, temperature=1.0, seed=0), logprobs=True)
    groups[1][3].text, groups[1][3].token_ids, groups[1][3].logprobs

A training loop calls it on the model it trains: the model is switched to eval mode under
``torch.no_grad()`` for the call, and every module's training flag is restored afterwards (parameters,
``requires_grad`` and gradients are not touched). Not ``torch.inference_mode()``: lorakit's fused
sibling projections key their cached inputs on tensors' version counters, which inference tensors lack,
and the mixed-adapter stacks built during the call are reused by later calls outside it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import ConfigError
from .continuous import Running
from .kvcache import unspliceable_layers
from .rows import Row, special_ids
from .sampling import SamplingParams


@dataclass
class Completion:
    """One generated completion.

    Args:
        prompt_ids: the prompt's token ids (after the chat template, for messages).
        token_ids: the generated ids, an ending eos included.
        text: the decoded completion, special tokens skipped, cut before a stop string.
        finish_reason: "stop" (eos or a stop string) or "length" (max_tokens).
        logprobs: per token of ``token_ids``, its log-probability under ``log_softmax(logits / T)``
            (T = 1 for greedy) before top-k / top-p, when ``logprobs=True``; else None.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None


Prompt = Sequence[int] | str | Sequence[dict]


def encode_prompt(tokenizer: Any, prompt: Prompt, where: str = "prompt") -> list[int]:
    """Token ids of a prompt given as ids, as text (tokenized as is, no template) or as chat messages
    (the chat template applied with the generation prompt)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif prompt and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where} is a list of chat messages but the tokenizer has no chat template; "
                              "pass text or token ids instead")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise ConfigError(f"{where} must be token ids, a string or a list of chat messages "
                          f"({{'role': ..., 'content': ...}}), got {type(prompt).__name__}")
    if not ids:
        raise ConfigError(f"{where} is empty (0 tokens)")
    return list(ids)


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode without autograd; every module's own training flag
    comes back afterwards (dropout as it was), even when the block raises."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _seed(base: int | None, row: int) -> int | None:
    return None if base is None else base + row  # completion j of prompt i draws from seed + i * n + j


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Prompt], n: int = 1,
             sampling: SamplingParams | None = None, adapters: Sequence[str | None] | None = None,
             logprobs: bool = False, prefix_sharing: bool = True, max_rows: int = 64,
             progress: bool = False) -> list[list[Completion]]:
    """Generate ``n`` completions for each prompt with continuous batching (rows join as others finish).

    Args:
        model: a transformers causal LM (a QLoRA base, adapters, training mode: all fine; see the module
            docstring for what happens to its mode).
        tokenizer: its tokenizer.
        prompts: token-id lists, strings (tokenized as is) or chat-message lists (chat template applied
            with ``add_generation_prompt=True``).
        n: completions per prompt.
        sampling: decoding settings of every row (default ``SamplingParams()``). With a seed, completion
            j of prompt i draws from ``seed + i * n + j``: the same call gives the same completions.
        adapters: None runs the model as it is (its active adapters); otherwise one adapter name (or
            None: the base model alone) per prompt, run per row in one mixed-adapter batch.
        logprobs: also return each generated token's log-probability (:class:`Completion`).
        prefix_sharing: the n rows of a prompt, and rows whose prompts share a leading block, prefill the
            shared part once (exact: same logits as prefilling each alone).
        max_rows: rows in flight at most (the KV cache holds this many rows).
        progress: show a progress bar over completions.

    Returns:
        one list of ``n`` completions per prompt, in the order of ``prompts``.
    """
    sampling = sampling or SamplingParams()
    if getattr(model, "config", None) is None:
        raise ConfigError(f"generate: {type(model).__name__} has no transformers config; generate() runs transformers "
                          "causal LMs (their forward takes past_key_values, attention_mask and position_ids)")
    if kinds := unspliceable_layers(model.config):
        raise ConfigError(f"generate: the model's KV cache has {kinds} layers (sliding-window or linear attention); "
                          "generate() batches rows over full-attention caches only (transformers' "
                          "model.generate() runs such a model)")
    if n < 1 or max_rows < 1:
        raise ConfigError(f"generate: n and max_rows must be >= 1, got n={n}, max_rows={max_rows}")
    if adapters is not None and len(adapters) != len(prompts):
        raise ConfigError(f"generate: {len(adapters)} adapter names for {len(prompts)} prompts; give one per "
                          "prompt (None: the base model), or adapters=None for the model as it is")
    ids = [encode_prompt(tokenizer, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for i, prompt in enumerate(ids):
        if limit and len(prompt) + sampling.max_tokens > limit:
            raise ConfigError(f"prompts[{i}] ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
                              f"the model's context length of {limit} tokens")
    names = list(adapters) if adapters is not None else [None] * len(ids)
    rows = [[Row(prompt, names[i], replace(sampling, seed=_seed(sampling.seed, i * n + j)), index=j)
             for j in range(n)] for i, prompt in enumerate(ids)]
    eos_ids, pad_id = special_ids(model, tokenizer)
    with inference(model):
        running = Running(model, tokenizer, eos_ids, pad_id, mixed=adapters is not None,
                          prefix_sharing=prefix_sharing, logprobs=logprobs)
        try:
            _run(running, [r for group in rows for r in group], n, max_rows, progress)
        finally:
            running.adapters.close()
    return [[Completion(r.prompt_ids, r.tokens, r.text, r.finish_reason, r.logprobs) for r in group]
            for group in rows]


def _run(running: Running, rows: list[Row], n: int, max_rows: int, progress: bool) -> None:
    """Admit the rows a prompt at a time (its n rows together, so they share their prefill) as room frees."""
    from tqdm.auto import tqdm

    waiting = deque(rows)
    with tqdm(total=len(rows), disable=not progress, desc="generate", unit="completion") as bar:
        while waiting or len(running):
            room = max_rows - len(running)
            take = min(len(waiting), room - room % n if n <= max_rows else room)
            if take:
                running.admit([waiting.popleft() for _ in range(take)])
            else:
                running.step()
            finished = sum(r.done for r in rows) - bar.n
            bar.update(finished)
            running.drop_done()
