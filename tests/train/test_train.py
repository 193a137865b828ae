"""The training loop on a tiny random model: loss falls, resume is exact, bad input fails early."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.models.dtype import native_bf16
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig, load_recipe
from lorakit.train.setup import resolve_dtype


def _data(tmp_path, n=24):
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes"} for i in range(n)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, tmp_path, out="run", **kw):
    base = dict(model=str(model_dir), data=str(_data(tmp_path)), eval_data=str(_data(tmp_path)),
                out=str(tmp_path / out), max_steps=20, batch_size=4, lr=1e-2, warmup_steps=2,
                eval_every=5, save_every=5, log_every=1, max_seq_len=32, r=4, alpha=8, seed=3, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_outputs_are_written(tiny_model_dir, tmp_path):
    summary = train(_cfg(tiny_model_dir, tmp_path, max_steps=40, lr=3e-2), progress=False)
    out = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png",
                 "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 40 and 0 < summary["trainable_percent"] < 100
    assert load_recipe(out / "config.yaml").max_steps == 40  # the resolved recipe reloads


def test_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(_cfg(tiny_model_dir, tmp_path, max_steps=5), progress=False)
    ids = torch.randint(0, 50, (2, 12))
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.load_adapter(ours, tmp_path / "run" / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "run" / "adapter"))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() < 1e-5
    assert not torch.equal(a, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("dropout, accum", [(0.0, 1), (0.1, 2)])
def test_resume_gives_the_same_adapter_as_a_straight_run(tiny_model_dir, tmp_path, monkeypatch, dropout, accum):
    straight = _cfg(tiny_model_dir, tmp_path, out="straight", dropout=dropout, grad_accum=accum)
    train(straight, progress=False)

    import lorakit.train.loop as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real_save(ckpt_dir, step, *args, **kwargs)
        if step == 10:
            raise _Killed
        return path

    broken = _cfg(tiny_model_dir, tmp_path, out="resumed", dropout=dropout, grad_accum=accum)
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(broken, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    broken.resume = True
    train(broken, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated records after the resume


def test_malformed_data_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    cfg = TrainConfig(model=str(tmp_path / "no-such-model"), data=str(bad), out=str(tmp_path / "o"))
    with pytest.raises(lk.DataError, match=r"bad.jsonl:2"):
        train(cfg, progress=False)


def test_non_finite_loss_stops_with_step_and_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.train.objectives.base as train_mod

    real = train_mod.loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, n = real(model, batch)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] == 7 else (loss, n)

    monkeypatch.setattr(train_mod, "loss_sum", poisoned)
    with pytest.raises(lk.LorakitError, match=r"non-finite loss at step 7.*step-0000005"):
        train(_cfg(tiny_model_dir, tmp_path), progress=False)


def test_existing_run_needs_resume(tiny_model_dir, tmp_path):
    train(_cfg(tiny_model_dir, tmp_path, max_steps=5), progress=False)
    with pytest.raises(lk.LorakitError, match="--resume"):
        train(_cfg(tiny_model_dir, tmp_path, max_steps=5), progress=False)


def test_recipe_unknown_key_lists_valid_keys_and_flags_override(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(lk.ConfigError, match=r"unknown key 'max_step'.*did you mean 'max_steps'"):
        load_recipe(bad)
    good = tmp_path / "g.yaml"
    good.write_text("max_steps: 3\nlr: 0.5\n")
    cfg = load_recipe(good, {"lr": 0.1, "r": None})
    assert (cfg.max_steps, cfg.lr, cfg.r) == (3, 0.1, 8)
    with pytest.raises(lk.ConfigError, match="batch_size must be an integer >= 1"):
        load_recipe(good, {"batch_size": 0})


def test_auto_dtype_is_bf16_only_where_it_is_native(monkeypatch):
    cfg = TrainConfig(model="m", data="dates")
    assert cfg.dtype == "auto"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype(cfg, "cpu")[0] == "bfloat16"
    assert resolve_dtype(TrainConfig(model="m", data="dates", full=True), "cpu")[0] == "float32"
    assert resolve_dtype(TrainConfig(model="m", data="dates", dtype="float16"), "cpu") == ("float16", "as configured")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype(cfg, "cpu")[0] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def emulated_only(including_emulation=True):  # a GPU that has bf16 only by emulation (a T4)
        seen.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert resolve_dtype(cfg, "cuda")[0] == "float32" and seen == [False]
    with pytest.raises(ConfigError, match="accepted: auto, float32, bfloat16, float16, fp32"):
        TrainConfig(model="m", data="dates", dtype="fp8")
    assert TrainConfig(model="m", data="dates", dtype="BF16").dtype == "bfloat16"  # short names, one parser


def test_cli_train_prints_table(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli.main import main

    data = _data(tmp_path)
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "cli"),
               "--max-steps", "3", "--batch-size", "2", "--max-seq-len", "32", "--r", "2",
               "--target-modules", "q_proj", "v_proj"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "lora result" in out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    expected = "bfloat16" if native_bf16("cpu") else "float32"  # no --dtype: auto
    assert summary["dtype"] == expected and f"base weights in {expected} (auto: " in out
    cfg = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.real_model
def test_real_smollm2_trains_a_few_steps(tmp_path):
    cfg = load_recipe(None, {"out": str(tmp_path / "real"), "max_steps": 3, "eval_every": 0, "save_every": 0,
                             "batch_size": 2, "score_limit": 4, "eval_batches": 1, "log_every": 1})
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3 and summary["after"]["n"] == 4
    assert 1.0 < summary["trainable_percent"] < 3.0  # r=8 all-linear on 135M: ~1.8%


def test_full_fine_tuning_trains_every_weight_and_saves_a_model_dir(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = train(_cfg(tiny_model_dir, tmp_path, max_steps=6, lr=1e-3, full=True), progress=False)
    assert summary["mode"] == "full" and summary["trainable_percent"] == 100.0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters(), strict=True)
               if not torch.equal(a, b)]
    assert len(changed) == len(list(base.named_parameters()))  # every tensor moved, norms included
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter").exists()


def test_non_finite_gradient_norm_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def exploding(params, max_norm):
        norm = real(params, max_norm)
        calls["n"] += 1
        return torch.tensor(float("inf")) if calls["n"] == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    with pytest.raises(lk.LorakitError, match=r"non-finite gradient norm at step 3.*none"):
        train(_cfg(tiny_model_dir, tmp_path), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, tmp_path, dropout):
    """Recomputing blocks in backward changes memory, not results (the RNG is replayed for dropout)."""
    plain = _cfg(tiny_model_dir, tmp_path, out="plain", max_steps=4, dropout=dropout)
    ckpt = _cfg(tiny_model_dir, tmp_path, out="ckpt", max_steps=4, dropout=dropout, gradient_checkpointing=True)
    train(plain, progress=False)
    train(ckpt, progress=False)
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained


def test_truncation_is_counted_and_reported(tiny_model_dir, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "x" * (40 if i % 2 else 5) + " say ", "completion": "yes"}) + "\n"
                            for i in range(8)))
    summary = train(_cfg(tiny_model_dir, tmp_path, data=str(long), eval_data=None, max_steps=2, max_seq_len=24),
                    progress=False)
    assert summary["data"]["train"]["n_truncated"] == 0 and summary["data"]["train"]["n_dropped"] == 4
    assert "4 dropped" in capsys.readouterr().out


def test_variants_resume_exactly_and_save_a_plain_lora(tiny_model_dir, tmp_path, monkeypatch):
    """DoRA + PiSSA + LoRA+ + NEFTune in one run: killed at step 10 and resumed, the adapter is the
    straight run's; it is saved converted (rank 2r, init true) and PEFT gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit.train.loop as train_mod

    kw = dict(dora=True, init_lora_weights="pissa", loraplus_lr_ratio=8, neftune_alpha=5.0,
              max_steps=14, dropout=0.1)
    train(_cfg(tiny_model_dir, tmp_path, out="straight", **kw), progress=False)
    real_save = train_mod.save_checkpoint

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real_save(ckpt_dir, step, *args, **kwargs)
        if step == 10:
            raise _Killed
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(_cfg(tiny_model_dir, tmp_path, out="resumed", **kw), progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    train(_cfg(tiny_model_dir, tmp_path, out="resumed", resume=True, **kw), progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("magnitude" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    saved = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"], saved["use_dora"]) == (8, 16, True, True)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "straight" / "adapter"))
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.load_adapter(ours, tmp_path / "straight" / "adapter")
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5


def test_trainable_token_indices_from_the_recipe_train_only_those_rows_in_peft_format(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lorakit.train.loop import train

    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=4, target_modules=["q_proj"], trainable_token_indices=["3", "5"])
    train(cfg, progress=False)
    adapter = tmp_path / "run" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        deltas = [k for k in f.keys() if "trainable_tokens_delta" in k]
        assert len(deltas) == 1 and tuple(f.get_slice(deltas[0]).get_shape())[0] == 2  # two rows of one table
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.load_adapter(ours, adapter)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    ids = torch.tensor([[1, 3, 4, 5, 9]])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5
        emb = ours.get_input_embeddings()(torch.arange(10))
        plain = base.get_input_embeddings()(torch.arange(10))
    changed = (emb - plain).abs().amax(1) > 0
    moved = changed.nonzero().flatten().tolist()
    assert moved and set(moved) <= {3, 5}  # only chosen rows moved (a row the data never shows gets no gradient)


def test_trainable_token_indices_flags_parse_ids_or_one_table_each():
    from lorakit.lora.config import token_indices_from_flags

    assert token_indices_from_flags(["3", "5"]) == [3, 5]
    assert token_indices_from_flags(["embed_tokens=3,5", "speech_embedding=1"]) == {"embed_tokens": [3, 5],
                                                                                    "speech_embedding": [1]}
    assert token_indices_from_flags([]) is None
    with pytest.raises(lk.ConfigError, match="EMBEDDING=ID"):
        token_indices_from_flags(["embed_tokens=3,x"])
