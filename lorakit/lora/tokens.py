"""Selected rows of an embedding trained in full: PEFT's ``trainable_token_indices`` (new tokens added to a
vocabulary, or a few existing ones), without training or saving the whole table.

A ``TrainableTokens`` layer keeps the frozen table (``base_layer``) and, per adapter, the rows' values
(``trainable_tokens_delta[name]``, (n, dim): values that replace the rows, as PEFT stores them) and
their original values (to unmerge). Its forward looks rows up in the table with those rows replaced, so
only they receive gradients. A module whose weight *is* the table (an output head tied to the input
embedding) is wrapped too, reading the same rows: training sees what the merged model will.

On disk (PEFT's format): ``base_model.model.<path>.token_adapter.trainable_tokens_delta`` for the
embedding only, and ``trainable_token_indices`` in adapter_config.json.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, TargetError


class TrainableTokens(nn.Module):
    """Rows ``token_indices[name]`` of ``base_layer.weight`` (an Embedding, or a Linear tied to one) trained."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None):
        super().__init__()
        self.base_layer = base_layer
        self._tied = (tied_to,) if tied_to is not None else ()  # a tuple: not registered, not saved twice
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.originals: dict[str, torch.Tensor] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        base_layer.requires_grad_(False)

    def __getattr__(self, name: str):
        """What the wrapped module has (num_embeddings, padding_idx, in_features, ...) reads through."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def source(self) -> TrainableTokens:
        """The layer holding the rows (the embedding's; a tied head reads them from there)."""
        return self._tied[0] if self._tied else self

    @property
    def adapters(self) -> list[str]:
        return list(self.source.trainable_tokens_delta)

    @property
    def weight(self) -> torch.Tensor:
        """The table with the active adapters' rows in place (what PEFT's wrapper returns too)."""
        return self._table(self._unmerged_active())

    def add_adapter(self, name: str, indices: list[int], init: bool = True) -> None:
        """Start adapter ``name`` on rows ``indices`` from their current values (init=False: random)."""
        if self._tied:
            return
        if name in self.trainable_tokens_delta:
            raise AdapterError(f"adapter {name!r} already trains tokens of this embedding")
        check_indices(indices, self.base_layer.weight.shape[0])
        originals = self.base_layer.weight.detach()[list(indices)].clone()
        values = originals.clone() if init else torch.randn_like(originals)
        self.trainable_tokens_delta[name] = nn.Parameter(values)
        self.token_indices[name] = list(indices)
        self.originals[name] = originals

    def delete_adapter(self, name: str) -> None:
        if self._tied:
            return
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged into the embedding; unmerge before deleting it")
        del self.trainable_tokens_delta[name]
        self.token_indices.pop(name)
        self.originals.pop(name)
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapters]

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active if n not in self.source.merged]

    def _table(self, names: list[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        src = self.source
        taken: set[int] = set()
        for name in names:
            rows = src.token_indices[name]
            if taken & set(rows):
                raise AdapterError(f"adapters {names} train some of the same tokens; activate one of them")
            taken |= set(rows)
            index = torch.tensor(rows, device=weight.device)
            weight = weight.index_copy(0, index, src.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Write the rows into the table (a tied head shares it, so it needs nothing); idempotent."""
        if self._tied:
            return
        for name in [n for n in dict.fromkeys(names) if n in self.adapters and n not in self.merged]:
            self.base_layer.weight.data = self._table([name]).detach()
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._tied:
            return
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.data.index_copy_(0, index, self.originals[name].to(weight))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base, table = self.base_layer, self._table(names)
        if isinstance(base, nn.Embedding):
            return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                               base.sparse)
        return F.linear(x, table, base.bias)

    def extra_repr(self) -> str:
        if self._tied:
            return "tied to the input embedding's trainable tokens"
        return ", ".join(f"{n}: {len(i)} tokens" for n, i in self.token_indices.items())


def token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]], modules: dict[str, nn.Module]
                  ) -> dict[str, list[int]]:
    """{embedding path: indices} for a ``trainable_token_indices`` value (a list means the input embedding:
    ``get_input_embeddings()``, else a module named ``embed_tokens``, as PEFT resolves it)."""
    if isinstance(spec, dict):
        wanted = spec
    else:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        found = [n for n, m in modules.items() if emb is not None and (m is emb or getattr(m, "base_layer", None) is emb)]
        wanted = {found[0] if found else "embed_tokens": spec}
    out = {}
    for entry, indices in wanted.items():
        paths = [n for n in modules if n == entry or n.endswith("." + entry)]
        if not paths:
            raise TargetError(f"trainable_token_indices names {entry!r}, which matches no module of the model; "
                              "give {'path.to.embedding': [ids]}")
        for path in paths:
            module = modules[path]
            base = module.base_layer if isinstance(module, TrainableTokens) else module
            if not isinstance(base, nn.Embedding):
                raise TargetError(f"trainable_token_indices: {path!r} is a {type(base).__name__}, not an nn.Embedding "
                                  "(LoRA or modules_to_save already hold it? train its rows or the whole table, "
                                  "not both)")
            check_indices(indices, base.num_embeddings)
            out[path] = list(indices)
    return out


def check_indices(indices: list[int], rows: int) -> None:
    """Raise TargetError unless ``indices`` are distinct row numbers of a table of ``rows`` rows."""
    if len(set(indices)) != len(indices) or not all(isinstance(i, int) and 0 <= i < rows for i in indices):
        raise TargetError(f"trainable_token_indices must be distinct integers in [0, {rows}) for this embedding of "
                          f"{rows} rows, got {indices}; resize the embedding first to add new tokens")


def tied_modules(model: nn.Module, weight: torch.Tensor, own: str) -> list[str]:
    """Paths of the modules other than ``own`` whose ``weight`` parameter is ``weight`` (tied heads)."""
    return [n for n, m in model.named_modules() if n != own and not isinstance(m, TrainableTokens)
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight is weight
            and isinstance(m, (nn.Linear, nn.Embedding))]
