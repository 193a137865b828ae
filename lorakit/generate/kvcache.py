"""A KV cache that rows enter and leave between decoding steps: slots of a batched transformers DynamicCache.

The running rows share one ``DynamicCache`` whose tensors are (B, kv_heads, T, head_dim), every row
right-aligned (left padding) and a (B, T) ``mask`` marking its real positions:

- a row leaves: its slot is dropped (``index_select`` on the batch axis), then leading columns that no
  remaining row uses are cut, so a long row that finished gives its memory back;
- rows join: they are prefilled together into a cache of their own, which is left-padded to the
  running cache's width (or the other way round) and concatenated on the batch axis.

Nobody else's keys and values are recomputed; each join or leave copies the cache once, about the
bytes one decoding step reads anyway. Why slots and not pages: transformers' attention reads one
contiguous (B, H, T, D) tensor per layer, so pages would have to be gathered into that tensor at every
step (a full copy per step, not per join) unless the attention kernel itself reads pages, which
plain PyTorch on CPU does not have. The price of slots is padding: a short row next to a long one
holds the long row's width; ``held_bytes`` against ``used_bytes`` shows it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token of one row takes in the cache of a model with ``config``."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def unspliceable_layers(config: Any) -> list[str]:
    """The kinds of cache layer of a model with ``config`` that rows cannot enter and leave (sliding-window
    or linear attention); empty when every layer is a full-attention DynamicLayer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    return sorted(kinds) if kinds - {DynamicLayer.__name__} else []


def splice_error(config: Any) -> str | None:
    """Why rows of this model cannot enter and leave a shared cache, with a server's fix (None: they can)."""
    kinds = unspliceable_layers(config)
    if kinds:
        return (f"the model's KV cache has {kinds} layers (sliding-window or linear attention); "
                "continuous batching splices only full-attention DynamicLayer caches: use --scheduler window")
    return None


class SlotCache:
    """The running rows' keys and values: a DynamicCache plus the (B, T) mask of real positions."""

    def __init__(self) -> None:
        self.cache: Any = None  # transformers.DynamicCache, or None while no row runs
        self.mask: torch.Tensor | None = None  # (B, T) long: 1 where the row has a real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def held_bytes(self) -> int:
        """Bytes the cache tensors take now, padding included."""
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def used_tokens(self) -> int:
        """Positions holding a real token, summed over rows (held_bytes is ``rows * width`` positions)."""
        return 0 if self.mask is None else int(self.mask.sum())

    def grow(self) -> torch.Tensor:
        """The attention mask for the next decoding step: every row gains one real position. (B, T+1)"""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (in that order), then cut columns no kept row uses."""
        if not indices:
            self.cache = self.mask = None
            return
        if indices == list(range(self.rows)):
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0)  # (T,)
        start = int(used.long().argmax())  # first column some row uses; rows are right-aligned
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:].contiguous()
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:].contiguous()

    def add(self, cache: Any, mask: torch.Tensor) -> None:
        """Append rows prefilled together: ``cache`` (a DynamicCache) and their (B_new, T_new) mask."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.width, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], dim=0)


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D) with zeros on the left (masked out, never read)."""
    return kv if kv.shape[2] == width else F.pad(kv, (0, 0, width - kv.shape[2], 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return mask if mask.shape[1] == width else F.pad(mask, (width - mask.shape[1], 0))
