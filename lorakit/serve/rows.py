"""A row submitted to the server: the core's decoding state plus what the server tracks around it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..generate.rows import Row


@dataclass
class ClientRow(Row):
    """One completion a client asked for; its ``sink`` is called from the engine thread.

    ``cancelled`` is set from the HTTP side when the client goes away; the row leaves at the next step.
    """

    cancelled: threading.Event = field(default_factory=threading.Event)
    unpinned: bool = False  # the engine's bookkeeping: this row no longer holds its adapter
    arrival_step: int = 0  # the engine's decoding step when the row reached the scheduler (admission order)
    submitted_at: float = field(default_factory=time.monotonic)

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()
