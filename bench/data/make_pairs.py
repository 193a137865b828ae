"""Generate the preference bench's pairs (bench/data/pairs_{train,eval}.jsonl), offline and deterministic.

Conversational pairs (TRL's form: prompt, chosen and rejected as message lists) with lengths shaped like a
public chat preference set, scaled to a CPU: log-normal prompts (median ~60 SmolLM2 tokens) and answers
(median ~120 tokens each, chosen and rejected drawn apart), so rows in a batch differ in length as they do
in UltraFeedback-style data. The preference is learnable: the chosen answer stays on the asked topic and
keeps the asked form (a numbered list or prose); the rejected one drifts to another topic and ignores the
form. ``python -m bench.data.make_pairs`` rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import random

from .make_chat import OUT, TOKENS_PER_WORD, TOPICS, _text


def _words(rng: random.Random, median_tokens: float, low: int, high: int) -> int:
    tokens = min(high, max(low, int(math.exp(rng.gauss(math.log(median_tokens), 0.7)))))
    return max(4, int(tokens / TOKENS_PER_WORD))


def pair(rng: random.Random) -> dict:
    """One prompt with an on-topic, well-formed chosen answer and an off-topic, ill-formed rejected one."""
    topic, other = rng.sample(TOPICS, 2)
    numbered = rng.random() < 0.5
    ask = f"Tell me about {topic}{' as a numbered list' if numbered else ''}. "
    prompt = [{"role": "user", "content": ask + _text(rng, _words(rng, 60, 12, 300), False)}]
    chosen = f"About {topic}:\n" + _text(rng, _words(rng, 120, 12, 400), numbered)
    rejected = f"About {other}:\n" + _text(rng, _words(rng, 120, 12, 400), not numbered)
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--eval", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    for split, n in (("train", args.train), ("eval", args.eval)):
        rows = [pair(rng) for _ in range(n)]
        (OUT / f"pairs_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
