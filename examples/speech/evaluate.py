"""Held-out phoneme error rate and exact-word rate of the speech demo, before and after training.

    python examples/speech/evaluate.py runs/demo-speech [--data examples/speech/test.jsonl]

builds the model as ``lorakit train`` did (``model.build``), decodes every held-out word greedily
(speech tokens until eos) without the adapter and then with ``RUN/adapter`` loaded, prints a
before/after table and writes the figures to ``RUN/speech_eval.json``.

- phoneme error rate (PER): the Levenshtein distance between decoded and reference phoneme
  symbols (stress marks included), summed over the words, divided by the summed reference lengths;
- exact-word rate: the share of words whose whole phoneme sequence is right.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def edit_distance(hyp: list, ref: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1) between two sequences."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        cur = [i]
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def error_rates(hyps: list[list], refs: list[list]) -> dict[str, float]:
    """``phoneme_error_rate`` (summed edit distance / summed reference length) and ``exact_word_rate``.

    Args:
        hyps: decoded symbol (or id) sequences, one per word.
        refs: the reference sequences, as many, none empty.
    """
    if len(hyps) != len(refs) or not refs:
        raise ValueError(f"need one hypothesis per reference and at least one word; got {len(hyps)} and {len(refs)}")
    errors = sum(edit_distance(h, r) for h, r in zip(hyps, refs, strict=True))
    return {"phoneme_error_rate": errors / sum(len(r) for r in refs),
            "exact_word_rate": sum(list(h) == list(r) for h, r in zip(hyps, refs, strict=True)) / len(refs)}


def _model_module():
    name = "lorakit_example_speech_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def score(model, rows: list[dict], batch_size: int = 64) -> dict:
    """PER and exact-word rate of greedy decoding on ``rows`` (``text_ids``, ``speech_ids``), with the
    seconds it took."""
    start = time.perf_counter()
    max_len = max(len(r["speech_ids"]) for r in rows) + 8  # room to overshoot, never unbounded
    hyps = _model_module().greedy(model, [r["text_ids"] for r in rows], max_len=max_len, batch_size=batch_size)
    figures = error_rates(hyps, [r["speech_ids"] for r in rows])
    return {**figures, "words": len(rows), "seconds": time.perf_counter() - start, "decoded": hyps}


def main() -> None:
    import torch

    import lorakit as lk

    ap = argparse.ArgumentParser(description="Before/after phoneme error rate of the speech demo.")
    ap.add_argument("run", type=Path, help="the lorakit train output directory (holds adapter/)")
    ap.add_argument("--data", type=Path, default=HERE / "test.jsonl", help="held-out rows")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N words (0: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as many as the run trained with)")
    args = ap.parse_args()
    run = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").is_file() else {}
    threads = args.threads or run.get("threads") or 0
    if threads:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:args.limit or None]
    mod = _model_module()
    symbols = mod.inventory()
    model, _ = mod.build()
    before = score(model, rows, args.batch_size)
    lk.load_adapter(model, args.run / "adapter")
    after = score(model, rows, args.batch_size)
    print(f"\nheld-out Norwegian words ({len(rows)}, {args.data.name}), greedy decoding:")
    print(f"{'':24}{'before':>10}{'after':>10}")
    for key, label in (("phoneme_error_rate", "phoneme error rate"), ("exact_word_rate", "exact-word rate")):
        print(f"{label:24}{before[key]:>10.1%}{after[key]:>10.1%}")
    print(f"{'decoding time (s)':24}{before['seconds']:>10.1f}{after['seconds']:>10.1f}")
    if run:
        print(f"{'training':24}{run['steps']:>10} steps, {run['train_wall_s']:.0f} s, {run['threads']} thread(s)")
    print("\nexamples (word: reference | after training):")
    for row, hyp in list(zip(rows, after["decoded"], strict=True))[:8]:
        print(f"  {row['word']:12} {row['phonemes']:28} | {' '.join(symbols[i] for i in hyp)}")
    summary = {"data": str(args.data), "before": {k: v for k, v in before.items() if k != "decoded"},
               "after": {k: v for k, v in after.items() if k != "decoded"},
               "samples": [{"word": r["word"], "reference": r["phonemes"], "after": " ".join(symbols[i] for i in h)}
                           for r, h in zip(rows, after["decoded"], strict=True)]}
    from lorakit.fileio import atomic_write_text

    atomic_write_text(args.run / "speech_eval.json", json.dumps(summary, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
