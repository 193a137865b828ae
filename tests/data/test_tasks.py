"""Tests for the packaged `dates` task and lorakit.tasks helpers."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lorakit.data.readers import load_jsonl
from lorakit.data.tasks import SPLITS, exact_match, task_names, task_path
from lorakit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "Convert this date to ISO 8601 (YYYY-MM-DD): "
# Form -> strptime pattern, written independently of the generator; ordinal suffixes are checked
# and removed before parsing, and the weekday is checked separately (strptime ignores it).
STRPTIME = {
    "D Month YYYY": "%d %B %Y",
    "Month D, YYYY": "%B %d, %Y",
    "the Dth of Month YYYY": "the %d of %B %Y",
    "Mon D YYYY": "%b %d %Y",
    "Dth Month, YYYY": "%d %B, %Y",
    "YYYY/MM/DD": "%Y/%m/%d",
    "Weekday, Month D, YYYY": "%A, %B %d, %Y",
    "YYYY-Mon-DD": "%Y-%b-%d",
    "Month Dth, YYYY": "%B %d, %Y",
    "DD-Mon-YYYY": "%d-%b-%Y",
}
SIZES = {"train": 2000, "valid": 200, "test": 200}


def read(split):
    return [json.loads(line) for line in task_path("dates", split).read_text(encoding="utf-8").splitlines()]


def question_and_answer(record):
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert user["content"].startswith(PREFIX)
    return user["content"][len(PREFIX):], assistant["content"]


def parse(text: str, form: str) -> dt.date:
    """Parse ``text`` written in ``form``, checking ordinal suffixes and weekday names."""
    def strip_ordinal(m):
        n, suffix = int(m.group(1)), m.group(2)
        expected = "th" if 11 <= n <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        assert suffix == expected, f"{text!r}: wrong ordinal suffix"
        return m.group(1)

    if "Dth" in form:
        text = re.sub(r"\b(\d{1,2})(st|nd|rd|th)\b", strip_ordinal, text)
    parsed = dt.datetime.strptime(text, STRPTIME[form]).date()
    if form.startswith("Weekday"):
        assert text.split(",")[0] == parsed.strftime("%A"), f"{text!r}: wrong weekday"
    return parsed


def test_files_exist_and_load():
    assert "dates" in task_names()
    for split in SPLITS:
        path = task_path("dates", split)
        assert path.is_file()
        assert len(load_jsonl(path)) == SIZES[split]


def test_every_answer_is_the_iso_date_of_its_question():
    for split in SPLITS:
        for record in read(split):
            question, answer = question_and_answer(record)
            assert parse(question, record["form"]).isoformat() == answer, (split, question)
            assert 1950 <= int(answer[:4]) <= 2049


def test_splits_are_disjoint_by_date():
    dates = {split: [question_and_answer(r)[1] for r in read(split)] for split in SPLITS}
    for split in SPLITS:
        assert len(set(dates[split])) == len(dates[split]), f"{split} repeats a date"
    assert not set(dates["train"]) & set(dates["valid"])
    assert not set(dates["train"]) & set(dates["test"])
    assert not set(dates["valid"]) & set(dates["test"])


def test_every_form_is_evenly_represented_in_every_split():
    for split in SPLITS:
        counts = Counter(r["form"] for r in read(split))
        assert set(counts) == set(STRPTIME)
        assert set(counts.values()) == {SIZES[split] // len(STRPTIME)}


def test_the_forms_look_as_documented():
    spring = dt.date(2021, 3, 3)
    script = load_script()
    assert {form: script.render(spring, form) for form in STRPTIME} == {
        "D Month YYYY": "3 March 2021", "Month D, YYYY": "March 3, 2021",
        "the Dth of Month YYYY": "the 3rd of March 2021", "Mon D YYYY": "Mar 3 2021",
        "Dth Month, YYYY": "3rd March, 2021", "YYYY/MM/DD": "2021/03/03",
        "Weekday, Month D, YYYY": "Wednesday, March 3, 2021", "YYYY-Mon-DD": "2021-Mar-03",
        "Month Dth, YYYY": "March 3rd, 2021", "DD-Mon-YYYY": "03-Mar-2021",
    }
    assert [script.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def load_script():
    spec = importlib.util.spec_from_file_location("make_date_data", ROOT / "scripts" / "make_date_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_is_deterministic_and_matches_the_packaged_files(tmp_path):
    load_script().main(["--out", str(tmp_path)])
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == task_path("dates", split).read_bytes(), split


def test_task_path_rejects_unknown_names():
    with pytest.raises(DataError, match="unknown task 'nope'; packaged tasks: dates"):
        task_path("nope", "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        task_path("dates", "dev")


def test_exact_match_strips_whitespace():
    assert exact_match(" 2021-03-03\n", "2021-03-03")
    assert not exact_match("2021-03-03.", "2021-03-03")
    assert not exact_match("2021-3-3", "2021-03-03")
