"""The CLI verbs as a user runs them, on a tiny model directory."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.cli.main import main


def _adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                   base_model_name_or_path=str(tiny_model_dir)))
    return lk.save_adapter(model, tmp_path / "adapter"), model


def test_targets_lists_modules_and_counts(tiny_model_dir, capsys):
    assert main(["targets", str(tiny_model_dir), "--target-modules", "q_proj", "down_proj", "--r", "4",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {f"model.layers.{i}.{m}" for i in (0, 1)
                                          for m in ("self_attn.q_proj", "mlp.down_proj")}
    down = next(r for r in rows if r["name"].endswith("down_proj"))
    assert down["shape"] == [32, 64] and down["params"] == 4 * (32 + 64)


def test_targets_bad_pattern_is_a_clean_error(tiny_model_dir, capsys):
    assert main(["targets", str(tiny_model_dir), "--target-modules", "qproj"]) == 2
    err = capsys.readouterr().err
    assert "qproj" in err and "q_proj" in err and "Traceback" not in err


def test_info_describes_adapter(tiny_model_dir, tmp_path, capsys):
    _adapter(tiny_model_dir, tmp_path)
    assert main(["info", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 4 and info["modules"] == 4 and info["parameters"] == 2 * 4 * ((32 + 32) + (32 + 16))  # v_proj: 2 kv heads x 8 = 16


def test_merge_writes_a_plain_model_with_same_outputs(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path, model = _adapter(tiny_model_dir, tmp_path)
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(path), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 90, (2, 10))
    with torch.no_grad():
        assert (merged(ids).logits - model.eval()(ids).logits).abs().max() < 1e-5
    assert "max |logits(merged) - logits(unmerged)|" in capsys.readouterr().out


def test_eval_and_generate_run_on_a_task_file(tiny_model_dir, tmp_path, capsys):
    path, _ = _adapter(tiny_model_dir, tmp_path)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    assert main(["eval", "--adapter", str(path), "--data", str(data), "--max-new-tokens", "3"]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(path), "hello", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--model", str(tiny_model_dir), "hello", "--max-new-tokens", "4"]) == 0


def test_eval_json_fields(tiny_model_dir, tmp_path, capsys):
    path, _ = _adapter(tiny_model_dir, tmp_path)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["eval", "--adapter", str(path), "--data", str(data), "--json", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["n"] == 1 and result["eval_loss"] > 0 and 0 <= result["exact_match"] <= 1


def test_eval_reads_every_data_format_the_trainer_reads(tiny_model_dir, tmp_path, capsys):
    """An alpaca CSV and a sharegpt Parquet give the figures of the same examples written as chat JSONL."""
    import pandas as pd

    path, _ = _adapter(tiny_model_dir, tmp_path)
    rows = [("say a", "", "b"), ("say", "c", "d"), ("x", "", "yz")]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": i + (f"\n\n{x}" if x else "")},
                                                     {"role": "assistant", "content": o}]}) + "\n"
                            for i, x, o in rows))
    pd.DataFrame(rows, columns=["instruction", "input", "output"]).to_csv(tmp_path / "alpaca.csv", index=False)
    pd.DataFrame({"conversations": [[{"from": "human", "value": i + (f"\n\n{x}" if x else "")},
                                     {"from": "gpt", "value": o}] for i, x, o in rows]}).to_parquet(
        tmp_path / "sharegpt.parquet")
    results = []
    for data in ("chat.jsonl", "alpaca.csv", "sharegpt.parquet"):
        assert main(["eval", "--adapter", str(path), "--data", str(tmp_path / data), "--json",
                     "--max-new-tokens", "2"]) == 0
        out = capsys.readouterr().out
        results.append(json.loads(out[out.index("{"):]))
    assert [r["n"] for r in results] == [3, 3, 3]
    for r in results[1:]:
        assert r["eval_loss"] == results[0]["eval_loss"] and r["examples"] == results[0]["examples"]


def test_count_with_dora_adds_one_magnitude_per_output_feature(tiny_model_dir, capsys):
    args = ["count", str(tiny_model_dir), "--target-modules", "q_proj", "down_proj", "--r", "4", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)["trainable"]
    assert main([*args, "--dora"]) == 0
    dora = json.loads(capsys.readouterr().out)["trainable"]
    assert dora - plain == 2 * (32 + 32)  # two layers: q_proj and down_proj both have 32 outputs


def test_gradient_checkpointing_before_the_recipe_leaves_the_recipe_positional(tmp_path):
    from lorakit.cli.main import build_parser
    from lorakit.cli.train import bind_switch_values

    def parse(*argv):
        args = build_parser().parse_args(bind_switch_values(["train", *argv]))
        return args.recipe, args.gradient_checkpointing

    assert parse("--gradient-checkpointing", "my.yaml") == ("my.yaml", True)
    assert parse("--gradient-checkpointing", "auto", "my.yaml") == ("my.yaml", "auto")
    assert parse("my.yaml", "--gradient-checkpointing", "off") == ("my.yaml", False)
    assert parse("--gradient-checkpointing", "--r", "4") == (None, True)
    assert parse("my.yaml", "--no-gradient-checkpointing") == ("my.yaml", False)
    # and through main: the recipe file is the one read (its bad key is reported), not taken as the switch's value
    recipe = tmp_path / "r.yaml"
    recipe.write_text("no_such_key: 1\n")
    assert main(["train", "--gradient-checkpointing", str(recipe)]) == 2
