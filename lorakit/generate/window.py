"""Window batching: a batch of rows generated together to completion (a server's ``--scheduler window``,
kept to compare continuous batching against).

Prompts are left-padded; ``attention_mask`` hides the padding and ``position_ids`` count only real
tokens, so a row's logits do not depend on its batch-mates (batched == single, greedy).
"""

from __future__ import annotations

from typing import Any

import torch

from ..lora.mixed import mixed_batch
from .rows import Row, left_pad
from .sampling import choose_tokens, new_generator


@torch.no_grad()
def run_batch(model: torch.nn.Module, tokenizer: Any, rows: list[Row], eos_ids: set[int], pad_id: int) -> None:
    """Generate for ``rows`` together (each with its own adapter) until every row is done; finished rows
    keep their places (their tokens are ignored) until the longest ends.

    Args:
        model: a causal LM in eval mode holding the rows' adapters (none merged).
        tokenizer: decodes generated tokens for stop strings and streaming.
        rows: the rows; their sinks receive the output as it is produced.
        eos_ids: token ids that end a row.
        pad_id: id used for left padding (masked out).
    """
    device = next(model.parameters()).device
    for row in rows:
        row.generator = new_generator(row.params.seed, device)
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0 in every row
    past = None
    with mixed_batch(model, [r.adapter for r in rows]):
        for _ in range(max(r.params.max_tokens for r in rows)):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tokens, _ = choose_tokens(out.logits[:, -1].float(), rows)  # (B,)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                if not row.done:
                    row.push(token, tokenizer, eos_ids)
            if all(r.done for r in rows):
                break
            ids = tokens[:, None]  # (B, 1): finished rows keep decoding, their tokens are ignored
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
