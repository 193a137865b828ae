"""Every `lorakit ...` command line in README.md's shell code blocks runs, as a reader would paste it.

The commands run in order, in one scratch directory (so `--out runs/demo` of one feeds `--adapter
runs/demo/adapter` of the next), in-process through ``lorakit.cli.main.main``, against a tiny model
and tiny data instead of SmolLM2 and the packaged tasks. The substitution rules are general, so new
README commands are covered without touching this file:

- the embedded model's names, hub ids and placeholders (SPEC, MODEL) given to --model / --base or as
  the model positional of count / plan / targets become the tiny model directory; architecture
  presets (llama-2-7b ...) and config.json paths are kept;
- --tuned becomes a tiny fine-tuned copy; --data / --eval-data / --test-data placeholders and packaged
  task names become tiny JSONL files; --adapter / adapter positional placeholders a tiny adapter;
- optional groups ``[...]`` are left out, ``A | B`` alternatives keep A, ``...`` is dropped; other
  upper-case placeholders (N, DIR, TRAIN.jsonl, NAME=DIR) get the value of PLACEHOLDERS;
- `lorakit train` runs are shrunk (2 steps, batch 2, 32 tokens) and `lorakit serve` answers one
  GET /v1/models instead of serving forever.

A command that cannot run here goes in NOT_RUNNABLE with the reason. A failure names the README line.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# README command (as written, continuation lines joined) -> why it cannot run in a test
NOT_RUNNABLE = {
    "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST0 --master-port 29500 -m lorakit train "
    "recipe.yaml --lora-r 16 --fsdp": "several machines (torchrun on each node); tests/train/test_distributed.py "
                                      "runs 2 processes on one machine",
    "lorakit train --model examples/fish_dual_ar.py:build_tiny --loss examples/fish_dual_ar.py:loss --data "
    "codes.jsonl --target-modules wqkv wo w1 w2 w3 --modules-to-save codebook_embeddings --out runs/fish":
        "pre-tokenized codec rows for a model of your own; tests/train/test_custom_train.py runs such a model",
}
SHELLS = {"", "bash", "sh", "shell", "console", "zsh"}
EMBEDDED = {"smollm2-135m-instruct", "default", "huggingfacetb/smollm2-135m-instruct"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\.[a-z]+)?$|^[A-Z][A-Z_]*=[A-Z][A-Z_]*$")
# a placeholder's value after this flag (flag None: any flag / positional); numbers keep runs tiny
PLACEHOLDERS = {
    "--max-steps": "2", "--epochs": "1", "--batch-size": "2", "--grad-accum": "1", "--lr": "1e-3",
    "--max-seq-len": "32", "--r": "2", "--lora-r": "2", "--alpha": "4", "--dropout": "0.0", "--seed": "0",
    "--eval-every": "1", "--save-every": "1", "--seq-len": "32", "--max-new-tokens": "4", "--nproc": "1",
    "--stop-after": "1", "--tokens": "1M", "--energy": "0.9",
}
MODEL_POSITIONAL = {"count", "plan", "targets"}
ADAPTER_POSITIONAL = {"info", "analyze", "export"}
SHRINK_TRAIN = ["--batch-size", "2", "--max-seq-len", "32", "--eval-every", "0", "--save-every", "0",
                "--score-limit", "2", "--max-new-tokens", "4"]


def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, words) of each lorakit command line in the shell code blocks, continuations joined."""
    out, lines, fence, i = [], text.splitlines(), None, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip().lower()
        elif fence in SHELLS:
            command = line.strip().removeprefix("$ ")
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            words = shlex.split(command, comments=True)
            if words and (words[0] == "lorakit" or "-m lorakit" in " ".join(words)):
                out.append((start, words))
        i += 1
    return out


def _simplify(words: list[str]) -> list[str]:
    """Drop optional groups [..], keep the first of 'A | B' alternatives (a flag and its values each), drop '...'."""
    kept, depth, skipping, skipped_flag = [], 0, False, False
    for w in words:
        if depth or w.startswith("["):
            depth += w.count("[") - w.count("]")
            continue
        if w == "|":
            skipping, skipped_flag = True, False
            continue
        if skipping:
            if not (w.startswith("--") and skipped_flag):
                skipped_flag = skipped_flag or w.startswith("--")
                continue
            skipping = False
        if w not in ("...", "…"):
            kept.append(w)
    return kept


def _options(verb: str) -> dict[str, object]:
    """Option string -> argparse action of ``lorakit VERB``."""
    from lorakit.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    if verb not in sub.choices:
        return {}
    return {s: a for a in sub.choices[verb]._actions for s in a.option_strings}


class Sandbox:
    """The scratch directory, the tiny model / data / adapter, and the rules that swap them in."""

    def __init__(self, root: Path, model: Path, tuned: Path, adapter: Path, data: dict[str, Path]):
        self.root, self.model, self.tuned, self.adapter, self.data = root, model, tuned, adapter, data
        self.fresh = 0

    def _new_dir(self) -> str:
        self.fresh += 1
        return str(self.root / f"out-{self.fresh}")

    def value(self, flag: str | None, word: str, verb: str, where: str) -> str:
        placeholder = bool(PLACEHOLDER.match(word))
        if flag in ("--model", "--base") or (flag is None and verb in MODEL_POSITIONAL):
            hub_id = "/" in word and not Path(word).exists() and not word.endswith(".json")
            return str(self.model) if placeholder or word.lower() in EMBEDDED or hub_id else word
        if flag == "--tuned":
            return str(self.tuned) if placeholder or not Path(word).exists() else word
        if flag in ("--data", "--eval-data", "--test-data"):
            split = {"--data": "test" if verb == "eval" else "train", "--eval-data": "valid", "--test-data": "test"}
            return str(self.data[split[flag]]) if placeholder or not Path(word).exists() else word
        if flag == "--adapter" or (flag is None and verb in ADAPTER_POSITIONAL):
            name, eq, path = word.rpartition("=") if "=" in word else ("", "", word)
            path = str(self.adapter) if PLACEHOLDER.match(path) else path
            return f"{name}{eq}{path}"
        if not placeholder:
            return word
        if flag in PLACEHOLDERS:
            return PLACEHOLDERS[flag]
        if flag in ("--out", "--adapter-root") or word in ("DIR", "OUT"):
            return self._new_dir()
        raise AssertionError(f"{where}: no substitution rule for placeholder {word!r} after {flag or 'the verb'}; "
                             "add one to PLACEHOLDERS in tests/test_readme.py")

    def argv(self, words: list[str], where: str) -> list[str]:
        words = _simplify(words)
        words = words[words.index("lorakit") + 1:]
        verb, out, flag, options = words[0], [words[0]], None, _options(words[0])
        for w in words[1:]:
            if w.startswith("--"):
                flag = w.split("=", 1)[0]
                out.append(w)
                if "=" in w or getattr(options.get(flag), "nargs", None) == 0:
                    flag = None  # a switch, or --flag=value: what follows is positional
                continue
            out.append(self.value(flag, w, verb, where))
            if getattr(options.get(flag), "nargs", None) not in ("+", "*"):
                flag = None  # one value per flag, then positionals again
        if verb == "train":
            out += SHRINK_TRAIN + ([] if "--epochs" in out else ["--max-steps", "2"])
        return out


def _serve_once(monkeypatch) -> None:
    """`lorakit serve` builds its app, which answers GET /v1/models once, instead of serving forever."""
    import uvicorn
    from fastapi.testclient import TestClient

    def once(app, **kwargs):
        with TestClient(app) as client:
            response = client.get("/v1/models")
            assert response.status_code == 200, response.text

    monkeypatch.setattr(uvicorn, "run", once)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit as lk
    from lorakit.testing import write_tiny_model

    root = tmp_path_factory.mktemp("readme")
    model = write_tiny_model(root / "tiny-model")
    tuned = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.05)
    tuned.save_pretrained(root / "tiny-tuned")
    base = AutoModelForCausalLM.from_pretrained(model)
    lk.inject(base, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                  base_model_name_or_path=str(model), task_type="CAUSAL_LM"))
    lk.save_adapter(base, root / "tiny-adapter")
    rows = [{"prompt": f"date {i}", "completion": f"2021-0{i}-01"} for i in range(1, 7)]
    data = {}
    for split in ("train", "valid", "test"):
        data[split] = root / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "work").mkdir()
    return Sandbox(root / "work", model, root / "tiny-tuned", root / "tiny-adapter", data)


def test_readme_lists_its_commands():
    commands = [" ".join(words) for _, words in readme_commands(README.read_text(encoding="utf-8"))]
    assert any(c.startswith("lorakit train") for c in commands)
    stale = [c for c in NOT_RUNNABLE if c not in commands]
    assert not stale, f"NOT_RUNNABLE names commands README.md no longer has: {stale}"


def test_every_readme_command_runs(sandbox, monkeypatch):
    from lorakit.cli.main import main

    monkeypatch.chdir(sandbox.root)
    _serve_once(monkeypatch)
    for line, words in readme_commands(README.read_text(encoding="utf-8")):
        command = " ".join(words)
        if command in NOT_RUNNABLE:
            continue
        where = f"README.md:{line}: {command}"
        argv = sandbox.argv(words, where)
        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = main(argv)
        except SystemExit as exc:  # argparse refused it
            rc = exc.code
        assert rc == 0, (f"{where}\n  ran: lorakit {shlex.join(argv)}\n  exit {rc}: {err.getvalue()[-1500:]}\n"
                         "Fix the README line (or lorakit), or list it in NOT_RUNNABLE with the reason.")
