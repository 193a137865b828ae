"""Write the `speech` demo data: Norwegian Bokmål words -> their phoneme sequences from espeak-ng.

The words come from Debian's `wnorwegian` word list (/usr/share/dict/bokmaal, ISO-8859-1), the
phonemes from Debian's `espeak-ng` (voice `nb`). The committed files under examples/speech/ were
written with

    espeak-ng 1.51+dfsg-10+deb12u2 ("eSpeak NG text-to-speech: 1.51"), wnorwegian 2.2-4 (Debian 12)

and the script records the version it ran with in inventory.json. It needs espeak-ng and the word
list; training and evaluation do not (the data are committed).

Choices, all deterministic for one seed:

- Words: lower-case, letters a-z æ ø å only, 3-10 letters (no abbreviations, names or hyphenated
  compounds); a seeded sample, split by word into train / valid / test, so no test word is ever
  seen in training (inflections of one lemma may fall into different splits: espeak gives each
  form its own pronunciation, and that is what the model must generalise).
- Phonemes: `espeak-ng -v nb -q --ipa --sep=_` (IPA, phonemes separated by `_`). One symbol is one
  phoneme as espeak-ng writes it, length included (`uː`, `tː`) and diphthongs whole (`aɪ`, `øy`);
  the stress marks `ˈ` (primary) and `ˌ` (secondary) are KEPT, as symbols of their own placed
  before their vowel, since where a Norwegian word is stressed is part of how it sounds. The phoneme
  error rate counts them like any other symbol.
- Rows: JSONL, one word per line: `text_ids` (the word's SmolLM2 token ids, the word as written,
  no leading space, no special tokens), `speech_ids` (ids into the inventory), and for reading,
  `word` and `phonemes` (the symbols joined by spaces; text columns are not trained on).
- inventory.json: the symbols in id order (sorted by code point, so the ids do not depend on the
  sample), the espeak-ng version and the command line.

Usage: python scripts/make_speech_data.py [--out examples/speech] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

WORDLIST = Path("/usr/share/dict/bokmaal")
ESPEAK = ["espeak-ng", "-v", "nb", "-q", "--ipa", "--sep=_"]
WORD = re.compile(r"^[a-zæøå]{3,10}$")
STRESS = ("ˈ", "ˌ")
SIZES = {"train": 4000, "valid": 200, "test": 400}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "speech"


def read_words(path: Path = WORDLIST) -> list[str]:
    """The list's words that pass WORD, sorted and without duplicates."""
    if not path.is_file():
        sys.exit(f"{path} not found: install Debian's word list (apt-get install wnorwegian)")
    lines = path.read_text(encoding="latin-1").splitlines()
    return sorted({w for w in (line.strip() for line in lines) if WORD.match(w)})


def espeak_version() -> str:
    """`espeak-ng --version`, and the Debian package's version where dpkg knows it."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("Data at:")[0].strip()
    if shutil.which("dpkg-query") is None:
        return version
    dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "espeak-ng"], capture_output=True, text=True)
    return f"{version} (Debian espeak-ng {dpkg.stdout.strip()})" if dpkg.returncode == 0 else version


def phonemize(words: list[str]) -> list[str]:
    """espeak-ng's `_`-separated IPA for each word, in one process (one word per paragraph)."""
    out = subprocess.run(ESPEAK, input="\n\n".join(words) + "\n", capture_output=True, text=True,
                         check=True).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if len(lines) != len(words):
        sys.exit(f"espeak-ng returned {len(lines)} lines for {len(words)} words; cannot align them")
    return lines


def symbols(ipa: str) -> list[str]:
    """One word's phoneme symbols: split on `_`, empty pieces dropped, stress marks split off in front.

    >>> symbols("b_ˈy_ɡː_eː_f_ˌa_s_ə_r")
    ['b', 'ˈ', 'y', 'ɡː', 'eː', 'f', 'ˌ', 'a', 's', 'ə', 'r']
    """
    out = []
    for piece in ipa.split("_"):
        while piece[:1] in STRESS:
            out.append(piece[0])
            piece = piece[1:]
        if piece:
            out.append(piece)
    return out


def usable(ipa: str) -> bool:
    """False where espeak-ng switched language (`(en)...`) or read the word as several (a space)."""
    return bool(ipa) and "(" not in ipa and " " not in ipa


def build(seed: int) -> tuple[dict[str, list[tuple[str, list[str]]]], list[str]]:
    """({split: [(word, symbols)]}, the inventory)."""
    words = read_words()
    random.Random(seed).shuffle(words)
    need = sum(SIZES.values())
    pairs: list[tuple[str, list[str]]] = []
    start = 0
    while len(pairs) < need:  # a few words are dropped (language switches); draw more in order
        batch = words[start:start + need - len(pairs)]
        if not batch:
            sys.exit(f"only {len(pairs)} usable words in {WORDLIST}, need {need}")
        pairs += [(w, symbols(ipa)) for w, ipa in zip(batch, phonemize(batch), strict=True) if usable(ipa)]
        start += len(batch)
    splits, at = {}, 0
    for name, size in SIZES.items():
        splits[name] = pairs[at:at + size]
        at += size
    inventory = sorted({s for _, syms in pairs for s in syms})
    return splits, inventory


def write(out: Path, seed: int) -> None:
    from transformers import AutoTokenizer

    from lorakit.fileio import atomic_write_text
    from lorakit.models.load import local_tokenizer_files

    tokenizer = AutoTokenizer.from_pretrained(str(local_tokenizer_files("smollm2-135m-instruct")[0].parent))
    splits, inventory = build(seed)
    ids = {s: i for i, s in enumerate(inventory)}
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        rows = [{"text_ids": tokenizer(w, add_special_tokens=False)["input_ids"],
                 "speech_ids": [ids[s] for s in syms], "word": w, "phonemes": " ".join(syms)} for w, syms in pairs]
        atomic_write_text(out / f"{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {"symbols": inventory, "stress": list(STRESS), "espeak_ng": espeak_version(), "command": " ".join(ESPEAK),
            "wordlist": f"{WORDLIST} (Debian wnorwegian)", "seed": seed, "sizes": SIZES}
    atomic_write_text(out / "inventory.json", json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    print(f"{out}: " + ", ".join(f"{n} {len(p)}" for n, p in splits.items()) + f"; {len(inventory)} symbols")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.out, args.seed)


if __name__ == "__main__":
    main()
