"""RAM of a 1M-example tokenized set: built (cold), loaded from the token cache, packed.

    python -m bench.data.ram                    # 1,000,000 examples (bench/results/data_ram.json)
    python -m bench.data.ram --examples 20000   # a smoke run

A generated prompt/completion JSONL (long-tailed lengths, median ~50 SmolLM2 tokens) is read,
validated and tokenized into the cache in one process, then read and loaded from the cache and
packed in a second (what a second training run does); each reports its peak RSS. The bytes per
token of the former representation (a Python list of ids and one of labels per example) are
measured with tracemalloc on a sample and scaled to the whole set.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from ..harness import RESULTS, LoadMonitor, emit, recorded, run_worker, write_json

WORDS = ("the a one each small large quick slow warm cold water light soil seed root leaf stone wind rain "
         "road field market tool plan step check keep turn move hold mix wait test find note start finish "
         "before after while then also only because so but and with from into over under near first last").split()


def generate(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = min(900, max(10, int(math.exp(rng.gauss(math.log(40), 0.8)))))
            k = max(3, int(words * rng.uniform(0.2, 0.6)))
            text = [rng.choice(WORDS) for _ in range(words)]
            f.write(json.dumps({"prompt": " ".join(text[:k]), "completion": " ".join(text[k:])}) + "\n")


def tokenizer():
    from transformers import AutoTokenizer

    from lorakit.fileio import cache_root

    return AutoTokenizer.from_pretrained(cache_root() / "models" / "smollm2-135m-instruct")


def phase(data: str, cache: str, max_seq_len: int) -> dict:
    """One process's work: read + tokenize-or-load, then pack; peak RSS and timings."""
    import numpy as np

    from lorakit.data.cache import cached_tokenize
    from lorakit.data.packing import fill_rate, pack
    from lorakit.data.readers import read_records

    tok = tokenizer()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    records = read_records(data)
    t_read = time.perf_counter() - t0
    ds, how = cached_tokenize(records, tok, max_seq_len, cache, progress=True)
    t_tok = time.perf_counter() - t0 - t_read
    del records
    t1 = time.perf_counter()
    rows = pack(ds.lengths, max_seq_len)
    t_pack = time.perf_counter() - t1
    return {"cache": how, "examples": len(ds), "tokens": int(ds.stats.n_tokens), "array_mb": ds.nbytes / 2**20,
            "median_tokens": float(np.median(ds.lengths)), "read_s": t_read, "tokenize_or_load_s": t_tok,
            "pack_s": t_pack, "pack_rows": len(rows), "fill_rate": fill_rate(ds.lengths, rows, max_seq_len),
            "rss_before_mb": base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def python_lists_bytes_per_token(data: str, sample: int) -> float:
    """Bytes per token of the former representation: per example, a list of ids and one of labels."""
    from lorakit.data.readers import read_records
    from lorakit.data.tokenize import tokenize_examples

    records = list(read_records(data))[:sample]
    ds = tokenize_examples(records, tokenizer(), 2048)
    tracemalloc.start()
    lists = []
    for i in range(len(ds)):  # as the former tokenizer made them: labels share the ids' int objects
        start, end = int(ds.offsets[i]), int(ds.offsets[i + 1])
        ids = ds.ids[start:end].tolist()
        lists.append((ids, [x if m else -100 for x, m in zip(ids, ds.mask[start:end].tolist(), strict=True)]))
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert lists
    return size / ds.stats.n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--phase", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        emit(phase(*args.phase, args.max_seq_len))
        return
    with tempfile.TemporaryDirectory() as tmp, LoadMonitor() as load:
        data, cache = Path(tmp) / "data.jsonl", Path(tmp) / "cache"
        t0 = time.perf_counter()
        generate(data, args.examples)
        print(f"generated {args.examples:,} examples in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs = []
        for label in ("cold: read, tokenize, cache", "warm: read, load from cache"):
            cmd = ["-m", "bench.data.ram", "--phase", str(data), str(cache), "--max-seq-len", str(args.max_seq_len)]
            runs.append({"run": label, **run_worker(cmd)})
            print(runs[-1], file=sys.stderr)
        per_token = python_lists_bytes_per_token(str(data), 20_000)
        result = {"name": "data_ram", **recorded(load), "examples": args.examples,
                  "max_seq_len": args.max_seq_len, "data_file_mb": data.stat().st_size / 2**20, "runs": runs,
                  "python_lists_bytes_per_token": per_token,
                  "python_lists_mb_estimate": per_token * runs[0]["tokens"] / 2**20,
                  "note": "peak RSS includes the interpreter, torch and transformers (rss_before_mb); other "
                          "agents loaded the machine during the run"}
    write_json(RESULTS / "data_ram.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
