"""Stop strings: where a generated text ends, and how much of its tail to hold back while streaming."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1 when none occurs."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to send yet: a possible start of a stop string, or a partial
    UTF-8 character (decoded as U+FFFD) that the next token may complete."""
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
    return max(hold, len(text) - len(text.rstrip("\ufffd")))
