"""Preference pairs: TRL's standard, conversational and implicit-prompt forms tokenized as TRL's DPOTrainer
tokenizes them (its own functions are the reference), bad rows named by file:line or skipped and counted,
completions cut from the right and never to zero tokens, chosen rows then rejected rows in a batch."""

from __future__ import annotations

import json

import pytest
import torch
from builders import char_tokenizer
from trl.data_utils import common_prefix_length, extract_prompt

import lorakit as lk
from lorakit.data.preference import encode_pair, read_pairs, tokenize_pairs
from lorakit.errors import DataError

TOK = char_tokenizer()
USER = {"role": "user", "content": "What color is the sky?"}
CONV = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green!"}]}
STD = {"prompt": "2+2=", "chosen": "4", "rejected": "five"}


def trl_encode(row):
    """TRL 1.x DPOTrainer._prepare_dataset's tokenize_fn, written out with TRL's own helpers."""
    if "prompt" not in row:
        row = extract_prompt(row)
    if isinstance(row["chosen"], str):
        eos = TOK.eos_token
        row = {**row, "chosen": row["chosen"] + eos, "rejected": row["rejected"] + eos}
        p, pc, pr = (TOK(text=t)["input_ids"] for t in (row["prompt"], row["prompt"] + row["chosen"],
                                                       row["prompt"] + row["rejected"]))
    else:
        def tmpl(m, gen=False):
            return TOK.apply_chat_template(m, tokenize=True, return_dict=True, add_generation_prompt=gen)["input_ids"]
        p, pc, pr = tmpl(row["prompt"], True), tmpl(row["prompt"] + row["chosen"]), tmpl(row["prompt"] + row["rejected"])
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return list(p[:n]), list(pc[n:]), list(pr[n:])


@pytest.mark.parametrize("row", [
    STD,
    CONV,
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": [USER, {"role": "assistant", "content": "Blue."}], "rejected": [USER, {"role": "assistant",
                                                                                  "content": "Green."}]},
], ids=["standard", "conversational", "implicit-text", "implicit-messages"])
def test_pairs_tokenize_as_trl_does(row):
    assert encode_pair(TOK, row) == trl_encode(dict(row))


def test_the_conversational_completion_is_the_assistant_turn_with_its_end_of_turn():
    prompt, chosen, _ = encode_pair(TOK, CONV)
    assert TOK.decode(prompt).endswith("<|im_start|>assistant\n")
    assert TOK.decode(chosen) == "Blue.<|im_end|>\n"


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD = [
    ({"prompt": "x" * 80, "chosen": "a", "rejected": "b"}, "prompt alone is", "prompt_too_long"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty chosen", "empty_completion"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical", "identical"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": CONV["rejected"]},
     "empty chosen", "empty_completion"),
]


@pytest.mark.parametrize(("row", "message", "reason"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_pair_is_an_error_naming_its_line_or_a_counted_skip(tmp_path, row, message, reason):
    path = write(tmp_path / "p.jsonl", [STD, row, CONV])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{message}"):
        tokenize_pairs(read_pairs(path), TOK, 64)
    ds = tokenize_pairs(read_pairs(path, skip_bad=True), TOK, 64, skip_bad=True)
    assert len(ds) == 2 and ds.stats.skipped == {reason: 1}
    assert ds.pairs[0] == encode_pair(TOK, STD) and ds.pairs[1] == encode_pair(TOK, CONV)


@pytest.mark.parametrize(("row", "message", "reason"), BAD[1:], ids=[b[2] + str(i) for i, b in enumerate(BAD[1:])])
def test_empty_and_identical_completions_fail_at_read_time_before_any_tokenizer(tmp_path, row, message, reason):
    path = write(tmp_path / "p.jsonl", [STD, row, CONV])
    with pytest.raises(DataError, match=rf"p\.jsonl:2: .*{message}"):
        read_pairs(path)  # no tokenizer: lorakit train stops here, before the model loads
    records = read_pairs(path, skip_bad=True)
    assert records.formats == {"standard": 1, "conversational": 1, reason: 1}
    assert tokenize_pairs(records, TOK, 64, skip_bad=True).stats.skipped == {reason: 1}


@pytest.mark.parametrize(("row", "message"), [
    ('{"prompt": "q", "chosen": "a"}', r"missing \['rejected'\]"),
    ('{"prompt": null, "chosen": null, "rejected": "b"}', "'chosen' is null"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' must be one too"),
    ('{"prompt": "q", "chosen": [{"role": "bot", "content": "x"}], "rejected": "b"}', "unknown role 'bot'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_rows_fail_at_read_time_by_line_or_are_counted(tmp_path, row, message):
    path = write(tmp_path / "p.jsonl", [STD, STD, row])
    with pytest.raises(DataError, match=rf"p\.jsonl:3: .*{message}"):
        read_pairs(path)
    records = read_pairs(path, skip_bad=True)
    assert records.formats == {"standard": 2, "malformed": 1}
    assert tokenize_pairs(records, TOK, 32, skip_bad=True).stats.skipped == {"malformed": 1}


def test_long_pairs_keep_their_start_and_at_least_one_completion_token():
    row = {"prompt": "abcdefgh", "chosen": "0123456789", "rejected": "xy"}
    prompt, chosen, rejected = encode_pair(TOK, row)
    for limit in (len(prompt) + 1, len(prompt) + 4, 64):
        ds = tokenize_pairs([row], TOK, limit)
        p, c, r = ds.pairs[0]
        assert p == prompt and c == chosen[:limit - len(prompt)] and r == rejected[:limit - len(prompt)]
        assert len(c) >= 1 and len(r) >= 1
        assert ds.stats.n_truncated == (limit < len(prompt) + len(chosen))


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows_with_completion_masks():
    rows = [STD, CONV]
    batch = lk.preference_batch(TOK, rows, 64)
    pairs = [encode_pair(TOK, r) for r in rows]
    assert batch["input_ids"].shape[0] == 4
    for i, (p, c, r) in enumerate(pairs):
        for row, comp in ((i, c), (2 + i, r)):
            n = len(p) + len(comp)
            assert batch["input_ids"][row, :n].tolist() == p + comp
            assert batch["attention_mask"][row].sum() == n
            assert batch["completion_mask"][row].tolist() == [0] * len(p) + [1] * len(comp) + \
                [0] * (batch["input_ids"].shape[1] - n)
            assert torch.all(batch["input_ids"][row, n:] == TOK.pad_token_id)
