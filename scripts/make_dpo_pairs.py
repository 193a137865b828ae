"""Build the DPO demo's pairs from the date task (examples/dpo/dates-{train,valid,test}.jsonl).

Each pair is a date prompt of the packaged ``dates`` task, its ISO 8601 answer as the chosen completion, and
what the base model (the embedded SmolLM2-135M-Instruct, no adapter) actually answers, greedily, as the
rejected one: its first ``--max-tokens`` tokens (16, as the demo's exact-match generation; two thirds of the
answers run on into chat, "This is a special date ..."). The pairs teach the model away from its own
mistakes. A prompt the base already answers right gives no pair (chosen and rejected would be identical) and
is left out. Generated once (batched greedy
decoding, ``lorakit.train.evaluate.generate``) and committed, so every run trains on the same pairs:

    make dpo-pairs                              # rewrites the three files (95 s on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "dpo"
SIZES = {"train": 320, "valid": 40, "test": 100}


def main() -> None:
    from lorakit.data.tasks import task_path
    from lorakit.models.load import load_model
    from lorakit.train.evaluate import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m-instruct")
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        rows = [json.loads(line) for line in task_path("dates", split).read_text().splitlines()][:n]
        prompts = [r["messages"][:-1] for r in rows]
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        answers = generate(model, tok, texts, args.max_tokens, batch_size=40, progress=True)
        pairs = []
        for row, prompt, said in zip(rows, prompts, answers, strict=True):
            answer, said = row["messages"][-1]["content"], said.strip()
            if said and said != answer:
                pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                              "rejected": [{"role": "assistant", "content": said}]})
        (OUT / f"dates-{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{split}: {len(pairs)} pairs from {len(rows)} prompts ({len(rows) - len(pairs)} answered right "
              "or empty, left out)")


if __name__ == "__main__":
    main()
