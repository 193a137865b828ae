"""Generate the bench's variable-length chat dataset (bench/data/chat_longtail_{train,eval}.jsonl).

Single-turn conversations (a system message on some, a user request, the assistant's answer) whose
lengths are long-tailed like public instruction sets: log-normal, median ~200 SmolLM2 tokens,
clipped to 20-1,500 tokens. The text is drawn from a small English vocabulary with repeated
structure (numbered lists, requests that name their topic), so a model can learn something from
it. Deterministic: ``python -m bench.data.make_chat`` rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent  # bench/data/, beside this file
TOPICS = ["gardening", "bread baking", "river boats", "tax forms", "chess openings", "bicycle repair",
          "tide pools", "jazz piano", "cloud types", "bee keeping", "map reading", "kite design"]
WORDS = ("the a one each every small large quick slow early late warm cold bright dark simple careful "
         "water light soil seed root leaf stone wind rain sun moon road field market tool plan step list "
         "check keep turn move hold cut mix wait test find note mark start finish make use build clean "
         "before after while then also only often never always because so but and or with from into over "
         "under near far first second third last next better best good fine clear short long round flat").split()
TOKENS_PER_WORD = 1.35  # SmolLM2's tokenizer on this text (numbers, newlines included), measured


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int, numbered: bool) -> str:
    parts, n = [], 0
    while n < n_words:
        s = _sentence(rng)
        parts.append(f"{len(parts) + 1}. {s}" if numbered else s)
        n += len(s.split())
    return ("\n" if numbered else " ").join(parts)


def example(rng: random.Random) -> dict:
    """One conversation whose token count is drawn from the long-tailed distribution."""
    tokens = min(1500, max(20, int(math.exp(rng.gauss(math.log(200), 0.85)))))
    words = max(6, int(tokens / TOKENS_PER_WORD) - 22)  # less the chat template's and the request's tokens
    topic = rng.choice(TOPICS)
    user_words = max(4, int(words * rng.uniform(0.1, 0.5)))
    numbered = rng.random() < 0.5
    ask = f"Tell me about {topic}{' as a numbered list' if numbered else ''}. "
    messages = [{"role": "user", "content": ask + _text(rng, user_words, False)},
                {"role": "assistant", "content": f"About {topic}:\n" + _text(rng, words - user_words, numbered)}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You answer briefly and plainly."})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--eval", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("eval", args.eval)):
        rows = [example(rng) for _ in range(n)]
        (OUT / f"chat_longtail_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
