"""The speech demo (examples/speech/): the phoneme error rate against hand-computed edit distances, the
phoneme splitting of scripts/make_speech_data.py, batched greedy decoding against one-row decoding
with full recomputation (plain and with LoRA + modules_to_save), and the committed data's splits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "examples" / "speech"


def load(path: Path, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def ev():
    return load(SPEECH / "evaluate.py", "lorakit_example_speech_evaluate")


@pytest.fixture(scope="module")
def sm():
    return load(SPEECH / "model.py", "lorakit_example_speech_model")


@pytest.mark.parametrize(("hyp", "ref", "distance"), [
    ("kitten", "sitting", 3),  # k->s, e->i, +g
    ("flaw", "lawn", 2),  # -f, +n
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("ab", "ba", 2),  # no transpositions in Levenshtein
    (["ˈ", "a", "r"], ["a", "r", "ə"], 2),  # symbols, not characters: -ˈ, +ə
    (["ʃ", "ˈ", "uː"], ["ʃ", "ˈ", "u"], 1),  # uː and u are different symbols
])
def test_edit_distance_matches_hand_computed(ev, hyp, ref, distance):
    assert ev.edit_distance(list(hyp), list(ref)) == distance


def test_error_rates_sum_distances_over_reference_length(ev):
    hyps = [list("sitting"), list("lawn"), list("abc"), []]
    refs = [list("kitten"), list("flaw"), list("abc"), list("xy")]
    got = ev.error_rates(hyps, refs)
    assert got["phoneme_error_rate"] == pytest.approx((3 + 2 + 0 + 2) / (6 + 4 + 3 + 2))
    assert got["exact_word_rate"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        ev.error_rates(hyps[:2], refs)


def test_phonemes_split_stress_off_and_drop_empty_pieces():
    make = load(ROOT / "scripts" / "make_speech_data.py", "lorakit_script_make_speech_data")
    assert make.symbols("b_ˈy_ɡː_eː_f_ˌa_s_ə_r") == ["b", "ˈ", "y", "ɡː", "eː", "f", "ˌ", "a", "s", "ə", "r"]
    assert make.symbols("n_ˈiː__aʊ_ɡ_a") == ["n", "ˈ", "iː", "aʊ", "ɡ", "a"]  # espeak's "__" between vowels
    assert not make.usable("(en)h_ˈɛ_l_oʊ(nb)") and not make.usable("a b") and make.usable("ˈiː")


def reference_greedy(model, text: list[int], max_len: int) -> list[int]:
    """One row, no cache: the full forward over [sos] text [task] speech-so-far, argmax at the end."""
    speech: list[int] = []
    for _ in range(max_len):
        logits = model(torch.tensor([text]), torch.tensor([speech], dtype=torch.long).reshape(1, -1))
        token = int(logits[0, -1].argmax())
        if token >= model.speech_vocab_size:
            break
        speech.append(token)
    return speech


ROWS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [3, 4]]


def tiny_model(speech_vocab_size: int = 12, seed: int = 0):
    """SmolLM2's architecture (Llama) at toy size, wrapped as the demo wraps it; random, seeded."""
    from builders import tiny_llama

    from_example = load(SPEECH / "model.py", "lorakit_example_speech_model").cosyvoice()
    llm = tiny_llama(seed)
    torch.manual_seed(seed)
    return from_example.wrap(llm, speech_vocab_size).eval()


def test_batched_greedy_equals_one_row_decoding(sm):
    model = tiny_model()
    got = sm.greedy(model, ROWS, max_len=10, batch_size=3)  # two batches, left padding in both
    assert got == [reference_greedy(model, r, 10) for r in ROWS]
    assert got == [model.inference(r, max_len=10) for r in ROWS]  # the example's own cached decoding
    assert any(len(g) < 10 for g in got) and any(len(g) > 0 for g in got)  # some stop at eos, some speak


def test_batched_greedy_on_adapted_model_with_new_modules(sm):
    model = tiny_model()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   modules_to_save=sm.MODULES_TO_SAVE))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # B != 0 and changed copies: the adapter must change the decoding
                p.add_(torch.randn_like(p) * 0.3)
    got = sm.greedy(model, ROWS, max_len=10, batch_size=4)
    assert got == [reference_greedy(model, r, 10) for r in ROWS]
    lk.set_active(model, [])
    assert sm.greedy(model, ROWS, max_len=10) != got


def test_init_from_text_copies_mean_text_embeddings(sm):
    class Tok:  # symbol -> token ids, as a tokenizer splits a spelling
        ids = {"a": [3], "ʃ": [4, 5], "uː": [6, 7, 8]}
        special = {"<|im_start|>": 1, "<|im_end|>": 2, ":": 9, "<|endoftext|>": 0}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.ids[text]}

        def convert_tokens_to_ids(self, token):
            return self.special[token]

    model = tiny_model(speech_vocab_size=3)
    sm.init_from_text(model, Tok(), ["a", "ʃ", "uː"])
    table = model.llm.model.get_input_embeddings().weight
    want = torch.stack([table[3], table[4:6].mean(0), table[6:9].mean(0), table[1], table[2], table[9], table[0]])
    torch.testing.assert_close(model.speech_embedding.weight, want)
    torch.testing.assert_close(model.llm_decoder.weight, want)


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (SPEECH / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_committed_data_splits_are_disjoint_and_ids_match_the_inventory(sm):
    symbols = sm.inventory()
    splits = {s: read(s) for s in ("train", "valid", "test")}
    words = {s: {r["word"] for r in rows} for s, rows in splits.items()}
    assert not words["train"] & words["test"] and not words["train"] & words["valid"]
    assert not words["valid"] & words["test"]
    assert len(symbols) == len(set(symbols)) and {"ˈ", "ˌ"} <= set(symbols)
    for rows in splits.values():
        for r in rows:
            assert [symbols[i] for i in r["speech_ids"]] == r["phonemes"].split(" ")
            assert r["text_ids"] and all(isinstance(t, int) and t >= 0 for t in r["text_ids"])


@pytest.mark.real_model
def test_committed_text_ids_are_smollm2_tokens_of_the_word():
    from lorakit.models.load import load_model

    _, tok = load_model("smollm2-135m-instruct")
    for r in read("test")[:50]:
        assert tok.decode(r["text_ids"]) == r["word"]
        assert tok(r["word"], add_special_tokens=False)["input_ids"] == r["text_ids"]
