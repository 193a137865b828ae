"""Which waiting rows join the running batch, and in what order (the continuous scheduler's admission).

Two policies (``Limits.admission``):

- ``"shortest"`` (default): highest response ratio next. A waiting row's priority is
  ``(steps waited + 1) / max_tokens``, steps counted in the engine's decoding steps: among rows that
  arrive together the one asking for fewer tokens goes first, and a long row's priority grows while it
  waits, so it cannot starve (a row asking for L tokens overtakes any newcomer asking for s once it has
  waited about L / s steps). Ties go to the older row.
- ``"fcfs"``: oldest first.

Counting the wait in decoding steps rather than seconds keeps the order independent of the machine's
speed (and reproducible in tests). ``max_tokens`` is the only length known at admission: a row that
stops early at an eos or a stop string was ranked by its bound.
"""

from __future__ import annotations

import queue

from .limits import ADMISSIONS
from .rows import ClientRow


class Waiting:
    """Rows submitted and not yet admitted, in arrival order.

    Args:
        policy: one of :data:`ADMISSIONS`.
    """

    def __init__(self, policy: str = "shortest"):
        if policy not in ADMISSIONS:
            raise ValueError(f"admission policy must be one of {ADMISSIONS}, got {policy!r}")
        self.policy = policy
        self.rows: list[ClientRow] = []

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, source: queue.Queue, step: int, block: bool) -> bool:
        """Move every row queued in ``source`` here (waiting for a first one if ``block``), stamping each
        with the decoding step it arrived at; an item may be a list of rows queued together (the n
        completions of a request: they arrive, and so are admitted, side by side). Returns True when a
        shutdown marker (None) was read; the rows queued after it stay in ``source``."""
        while True:
            try:
                item = source.get(block=block)
            except queue.Empty:
                return False
            if item is None:
                return True
            for row in item if isinstance(item, list) else [item]:
                row.arrival_step = step
                self.rows.append(row)
            block = False

    def drop_cancelled(self) -> list[ClientRow]:
        """Remove the rows whose client went away; returns them."""
        gone = [r for r in self.rows if r.cancelled.is_set()]
        if gone:
            self.rows = [r for r in self.rows if not r.cancelled.is_set()]
        return gone

    def pick(self, room: int, step: int) -> list[ClientRow]:
        """Remove and return the (up to ``room``) rows the policy admits at decoding step ``step``, in arrival order."""
        if room <= 0 or not self.rows:
            return []
        order = list(range(len(self.rows)))
        if self.policy == "shortest":
            order.sort(key=lambda i: (-self.priority(self.rows[i], step), i))
        chosen = set(order[:room])
        picked = [r for i, r in enumerate(self.rows) if i in chosen]  # prefilled in arrival order
        self.rows = [r for i, r in enumerate(self.rows) if i not in chosen]
        return picked

    @staticmethod
    def priority(row: ClientRow, step: int) -> float:
        """Highest response ratio next: (steps waited + 1) / max_tokens."""
        return (step - row.arrival_step + 1) / row.params.max_tokens
