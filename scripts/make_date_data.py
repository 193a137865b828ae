"""Write the `dates` demo task: dates in ten English surface forms -> ISO 8601 (YYYY-MM-DD).

Deterministic: the same seed gives byte-identical files. Every calendar date appears in one
split only, dates range over 1950-2049, and line i of every split uses form i % 10, so each
form is equally represented in every split (and in every prefix of a multiple of ten lines).
Numeric day/month forms other than year-first ones are avoided: 03.04.2021 is ambiguous.

Usage: python scripts/make_date_data.py [--out lorakit/tasks/dates] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
from pathlib import Path

PROMPT = "Convert this date to ISO 8601 (YYYY-MM-DD): {date}"
SIZES = {"train": 2000, "valid": 200, "test": 200}
FIRST, LAST = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lorakit" / "tasks" / "dates"
# Written out rather than taken from strftime, whose month and day names follow the locale.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 22 -> '22nd'."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _parts(d: dt.date) -> dict[str, str]:
    month = MONTHS[d.month - 1]
    return {"D": str(d.day), "DD": f"{d.day:02d}", "Dth": ordinal(d.day), "Month": month, "Mon": month[:3],
            "MM": f"{d.month:02d}", "YYYY": f"{d.year:04d}", "Weekday": WEEKDAYS[d.weekday()]}


# Form name (used as the record's "form" key) -> template over _parts; e.g. for 2021-03-03:
FORMS = {
    "D Month YYYY": "{D} {Month} {YYYY}",                          # 3 March 2021
    "Month D, YYYY": "{Month} {D}, {YYYY}",                        # March 3, 2021
    "the Dth of Month YYYY": "the {Dth} of {Month} {YYYY}",        # the 3rd of March 2021
    "Mon D YYYY": "{Mon} {D} {YYYY}",                              # Mar 3 2021
    "Dth Month, YYYY": "{Dth} {Month}, {YYYY}",                    # 3rd March, 2021
    "YYYY/MM/DD": "{YYYY}/{MM}/{DD}",                              # 2021/03/03
    "Weekday, Month D, YYYY": "{Weekday}, {Month} {D}, {YYYY}",    # Wednesday, March 3, 2021
    "YYYY-Mon-DD": "{YYYY}-{Mon}-{DD}",                            # 2021-Mar-03
    "Month Dth, YYYY": "{Month} {Dth}, {YYYY}",                    # March 3rd, 2021
    "DD-Mon-YYYY": "{DD}-{Mon}-{YYYY}",                            # 03-Mar-2021
}


def render(d: dt.date, form: str) -> str:
    """The date ``d`` written in surface form ``form`` (a key of FORMS)."""
    return FORMS[form].format(**_parts(d))


def make_record(d: dt.date, form: str) -> dict:
    """One messages-format example: the question in ``form``, the ISO date as the answer."""
    return {"messages": [{"role": "user", "content": PROMPT.format(date=render(d, form))},
                         {"role": "assistant", "content": d.isoformat()}],
            "form": form}


def make_splits(seed: int = 0) -> dict[str, list[dict]]:
    """Draw distinct dates once, cut them into splits, and give line i of each split form i % 10."""
    n_days = (LAST - FIRST).days + 1
    offsets = random.Random(seed).sample(range(n_days), sum(SIZES.values()))
    forms = list(FORMS)
    splits, start = {}, 0
    for split, size in SIZES.items():
        dates = [FIRST + dt.timedelta(days=k) for k in offsets[start:start + size]]
        splits[split] = [make_record(d, forms[i % len(forms)]) for i, d in enumerate(dates)]
        start += size
    return splits


def write_splits(out_dir: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, records in make_splits(seed).items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed into place
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out`` folder (default: the packaged task folder), ``--seed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args(argv)
    for path in write_splits(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
