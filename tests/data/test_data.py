"""Tests for lorakit.data: formats, loss masks (token by token), truncation, validation, batching."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit.data.batching import BatchSampler, collate
from lorakit.data.readers import load_jsonl
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedExample, load, tokenize_examples
from lorakit.errors import DataError

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "</s>"]
WORDS = ["\n", "system", "user", "assistant", "be", "nice", "hello", "world", "hi", "there", "bye",
         "what", "is", "2", "two", "a", "b", "c", "d", "e", "f"]


def make_tokenizer(chat_template: str = CHATML) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: words split on spaces, each newline its own token."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, tokens):
    return tok.convert_tokens_to_ids(tokens)


def labels_of(tok, tokens):
    """Tokens with None where no loss is taken, as label ids."""
    return [IGNORE_INDEX if t is None else tok.convert_tokens_to_ids(t) for t in tokens]


def tokenize(tok, records, max_seq_len=64):
    return tokenize_examples(records, tok, max_seq_len)


def write(tmp_path, content: str | bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ---------------------------------------------------------------- loss masks, token by token


def test_text_trains_on_every_token_and_appends_eos(tok):
    ds = tokenize(tok, [{"text": "hello world"}])
    assert ds[0].input_ids == ids(tok, ["hello", "world", "</s>"])
    assert ds[0].labels == labels_of(tok, ["hello", "world", "</s>"])
    # position 0 is never a target after the shift
    assert ds.stats.n_tokens == 3 and ds.stats.n_trainable_tokens == 2


def test_prompt_completion_trains_on_completion_and_eos_only(tok):
    ds = tokenize(tok, [{"prompt": "what is 2", "completion": "two", "id": 7}])
    assert ds[0].input_ids == ids(tok, ["what", "is", "2", "two", "</s>"])
    assert ds[0].labels == labels_of(tok, [None, None, None, "two", "</s>"])
    assert ds.stats.n_trainable_tokens == 2


def test_messages_train_on_assistant_content_and_im_end_only(tok):
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there", "name": "ignored"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]
    ds = tokenize(tok, [{"messages": messages, "source": "extra keys are ignored"}])
    rows = [  # (token, trained?) for the whole ChatML rendering
        ("<|im_start|>", 0), ("system", 0), ("\n", 0), ("be", 0), ("nice", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("hello", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("hi", 1), ("there", 1), ("<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("bye", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("bye", 1), ("<|im_end|>", 1), ("\n", 0),
    ]
    assert ds[0].input_ids == ids(tok, [t for t, _ in rows])
    assert ds[0].labels == labels_of(tok, [t if trained else None for t, trained in rows])
    assert ds.stats.n_trainable_tokens == 5


def test_messages_without_assistant_are_dropped(tok):
    ds = tokenize(tok, [{"messages": [{"role": "user", "content": "hello"}]}, {"text": "hi"}])
    assert (ds.stats.n_examples, ds.stats.n_dropped) == (1, 1)


def test_template_that_is_not_prefix_stable_is_rejected():
    # Renders the last message differently, so earlier renderings are not prefixes of the whole.
    unstable = ("{% for m in messages %}{% if loop.last %}<|im_start|>{% endif %}{{ m['content'] }}\n"
                "{% endfor %}")
    records = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match=r"^<records> record 1: chat template is not prefix-stable"):
        tokenize(make_tokenizer(unstable), records)


def test_template_error_names_the_record():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
    records = [{"text": "hi"}, {"messages": [{"role": "system", "content": "be nice"},
                                            {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match=r"^<records> record 2: the chat template failed.*no system"):
        tokenize(make_tokenizer(strict), records)


def test_messages_need_a_chat_template():
    records = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match="chat template"):
        tokenize(make_tokenizer(chat_template=None), records)


# ---------------------------------------------------------------- truncation and stats


def test_truncation_keeps_the_start_and_counts(tok):
    records = [
        {"text": "a b c d e"},                              # 6 tokens -> cut to 4, kept
        {"prompt": "a b c d", "completion": "e"},           # prompt fills max_seq_len -> dropped
        {"prompt": "a b c", "completion": "d e"},           # keeps 'd' as its only target
        {"text": "a b"},                                    # 3 tokens, untouched
    ]
    ds = tokenize(tok, records, max_seq_len=4)
    assert ds[0].input_ids == ids(tok, ["a", "b", "c", "d"])
    assert ds[1].input_ids == ids(tok, ["a", "b", "c", "d"])
    assert ds[1].labels == labels_of(tok, [None, None, None, "d"])
    assert ds[2].input_ids == ids(tok, ["a", "b", "</s>"])
    s = ds.stats
    assert (s.n_examples, s.n_truncated, s.n_dropped) == (3, 2, 1)
    assert (s.n_tokens, s.n_trainable_tokens) == (11, 3 + 1 + 2)


def test_nothing_left_to_train_on_is_an_error(tok):
    with pytest.raises(DataError, match=r"no example has a token to train on \(2 records, all dropped"):
        tokenize(tok, [{"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "a b c", "completion": "d"}],
                 max_seq_len=3)
    with pytest.raises(DataError, match=r"^<records>: no example"):
        tokenize(tok, [])


def test_max_seq_len_must_be_sensible(tok):
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize(tok, [{"text": "hi"}], max_seq_len=1)


# ---------------------------------------------------------------- reading and validation


def test_load_jsonl_skips_blank_lines_and_tolerates_crlf_and_bom(tmp_path, tok):
    path = write(tmp_path, b'\xef\xbb\xbf{"text": "hello"}\r\n\r\n  \n{"prompt": "hi", "completion": "there"}\n')
    assert load_jsonl(path) == [{"text": "hello"}, {"prompt": "hi", "completion": "there"}]
    assert load(path, tok, 16).stats.n_examples == 2


def test_in_memory_records_are_validated_and_file_errors_name_the_path(tmp_path, tok):
    with pytest.raises(DataError, match=r"^<records> record 2: 'text' must be a string, found number"):
        tokenize(tok, [{"text": "hi"}, {"text": 3}])
    path = write(tmp_path, '\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                           '"content": "there"}]}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: the messages format needs"):  # file:line
        load(path, make_tokenizer(chat_template=None), 16)


BAD_LINES = {
    "malformed json": ('{"text": "hi"', "invalid JSON"),
    "array": ('["hi"]', "expected a JSON object, found array"),
    "number": ("3", "expected a JSON object, found number"),
    "no format": ('{"input": "hi"}', r"expected a 'text', 'prompt'\+'completion', 'messages', 'instruction'\+'output' \(alpaca\) or 'conversations' \(sharegpt\) key; found keys \['input'\]"),
    "two formats": ('{"text": "hi", "messages": []}', "expected exactly one of"),
    "text not str": ('{"text": 3}', "'text' must be a string, found number"),
    "prompt alone": ('{"prompt": "hi"}', "has 'prompt' but no 'completion'"),
    "completion null": ('{"prompt": "hi", "completion": null}', "'completion' must be a string, found null"),
    "messages not list": ('{"messages": "hi"}', "'messages' must be a non-empty array"),
    "messages empty": ('{"messages": []}', "found an empty array"),
    "message not object": ('{"messages": ["hi"]}', r"messages\[0\] must be an object"),
    "role missing": ('{"messages": [{"content": "hi"}]}', r"messages\[0\].role must be a string, found nothing"),
    "content not str": ('{"messages": [{"role": "user", "content": ["hi"]}]}',
                        r"messages\[0\].content must be a string, found array"),
    "unknown role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
                     r"messages\[1\] has unknown role 'bot'; expected one of system, user, assistant"),
    "assistant first": ('{"messages": [{"role": "assistant", "content": "hi"}]}',
                        "expected a system or user message first"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path, case):
    line, expected = BAD_LINES[case]
    path = write(tmp_path, '{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=expected) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_non_utf8_line_is_reported(tmp_path):
    path = write(tmp_path, b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"):
        load_jsonl(path)


def test_an_unpaired_surrogate_escape_is_reported_and_a_pair_is_text(tmp_path, tok):
    path = write(tmp_path, '{"text": "ok \\ud83d\\ude00"}\n{"prompt": "a", "completion": "b\\uDC00"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid Unicode \(an unpaired surrogate \\udc00\)"):
        load_jsonl(path)
    path = write(tmp_path, '{"text": "ok \\ud83d\\ude00"}\n{"text": "a \\\\ud800 is six characters"}\n')
    assert load_jsonl(path)[0]["text"] == "ok \U0001f600" and load(path, tok, 64).stats.n_examples == 2


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_file_without_examples(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(DataError, match="contains no examples"):
        load_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read dataset"):
        load_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- batching


def test_collate_right_pads(tok):
    batch = collate([TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_epochs_are_permutations_reshuffled_per_epoch():
    sampler = BatchSampler(10, 3, seed=1)
    assert len(sampler) == 4
    epochs = [take(sampler, 4) for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(i for b in batches for i in b) == list(range(10))
    orders = [[i for b in batches for i in b] for batches in epochs]
    assert len({tuple(o) for o in orders}) == 3


def test_sampler_is_deterministic_and_seed_dependent():
    assert take(BatchSampler(50, 4, seed=3), 40) == take(BatchSampler(50, 4, seed=3), 40)
    assert take(BatchSampler(50, 4, seed=3), 5) != take(BatchSampler(50, 4, seed=4), 5)


def test_sampler_drop_last():
    sampler = BatchSampler(10, 3, seed=0, drop_last=True)
    assert len(sampler) == 3
    assert all(len(b) == 3 for b in take(sampler, 9))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_resumes_mid_epoch_with_identical_batches(drop_last):
    reference = BatchSampler(23, 4, seed=7, drop_last=drop_last)
    expected = take(reference, 20)

    first = BatchSampler(23, 4, seed=7, drop_last=drop_last)
    seen = take(first, 8)  # mid-way through the second epoch
    state = json.loads(json.dumps(first.state_dict()))  # it survives a JSON checkpoint
    assert (state["epoch"], state["index"]) == (1, 12 if drop_last else 8)

    resumed = BatchSampler(23, 4, seed=7, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert seen + take(resumed, 12) == expected


def test_sampler_refuses_state_from_other_settings():
    state = BatchSampler(23, 4, seed=7).state_dict()
    with pytest.raises(DataError, match="saved with seed=7"):
        BatchSampler(23, 4, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="saved with n_examples=23"):
        BatchSampler(24, 4, seed=7).load_state_dict(state)
