"""lorakit.count: exact counts on the meta device, equal to PEFT's; adapter file sizes equal to real saves."""

import json
import warnings

import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

from lorakit.errors import ConfigError, ModelLoadError, TargetError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import inject
from lorakit.lora.io import save_adapter
from lorakit.plan.count import (
    build_meta_model,
    count_model,
    count_spec,
    format_count,
    load_spec_config,
    meta_model,
    preset_names,
    safetensors_size,
    shape_count,
)

PRESETS = ["bert-base", "gemma-2b", "gpt2", "llama-2-70b", "llama-2-7b", "llama-3-8b", "mistral-7b",
           "phi-3-mini", "qwen2-0.5b", "qwen2.5-7b"]
# Each preset's attention projections (what the original LoRA paper adapted: query and value)
ATTENTION = {"bert-base": ["query", "value"], "gpt2": ["c_attn"], "phi-3-mini": ["qkv_proj"]}


def test_presets_are_shipped():
    assert preset_names() == PRESETS


# ---- the seeds' numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("d, lora, percent", [(1024, 16_384, "1.56"), (4096, 65_536, "0.39")])
def test_one_square_matrix_at_r8(d, lora, percent):
    view = shape_count(d, d, 8)
    assert view["lora"] == lora == 8 * (d + d)
    assert f"{100 * view['ratio']:.2f}" == percent


def test_qwen2_05b_every_linear_of_its_24_blocks_at_r24():
    report = count_spec("qwen2-0.5b", LoraConfig(r=24, target_modules="all-linear"))
    assert report.trainable == 13_197_312
    assert {t.name.split(".")[2] for t in report.targets} == {str(i) for i in range(24)}
    assert report.base == 494_032_768  # Qwen2-0.5B's published size


def test_llama2_7b_every_linear_at_r8():
    report = count_spec("llama-2-7b", LoraConfig(r=8, target_modules="all-linear"))
    assert report.trainable == 19_988_480
    assert report.base == 6_738_415_616
    assert [(g.pattern.rsplit(".", 1)[-1], g.count) for g in report.groups] == [
        (n, 32) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert sum(g.subtotal for g in report.groups) == report.trainable


# ---- equal to PEFT on the same meta model ---------------------------------------------------------

def _targets(preset):
    return [{"target_modules": "all-linear"},
            {"target_modules": ATTENTION.get(preset, ["q_proj", "v_proj"]), "r": 16},
            {"target_modules": ATTENTION.get(preset, ["q_proj", "v_proj"]), "layers_to_transform": [0, 1]}]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_target_choice_equals_peft(preset):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    config = load_spec_config(preset)
    for kwargs in _targets(preset):
        ours = count_model(build_meta_model(config), LoraConfig(**kwargs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's fan_in_fan_out notice
            theirs = get_peft_model(build_meta_model(config), PeftConfig(**kwargs), low_cpu_mem_usage=True)
        assert (ours.trainable, ours.total) == theirs.get_nb_trainable_parameters(), (preset, kwargs)


def test_modules_to_save_and_embeddings_count_like_peft():
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    kwargs = {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}
    ours = count_model(tiny_llama(), LoraConfig(**kwargs))
    theirs = get_peft_model(tiny_llama(), PeftConfig(**kwargs))
    assert (ours.trainable, ours.total) == theirs.get_nb_trainable_parameters()


# ---- the adapter file -----------------------------------------------------------------------------

@pytest.mark.parametrize("make, kwargs", [
    (tiny_llama, {}),
    (tiny_qwen2, {"modules_to_save": ["lm_head"], "r": 3}),
    (tiny_llama, {"target_modules": ["embed_tokens", "q_proj"]}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"]}),
])
def test_adapter_bytes_equal_the_files_save_adapter_writes(make, kwargs, tmp_path):
    cfg = LoraConfig(**{"r": 4, **kwargs})
    model = make()
    report = count_model(model, cfg)
    meta = count_model(build_meta_model(make().config), cfg)
    assert report.header_exact and not meta.header_exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject(model, cfg)
    for dtype in ("float32", "float16", "bfloat16"):
        path = save_adapter(model, tmp_path / dtype, dtype=getattr(torch, dtype)) / "adapter_model.safetensors"
        size = report.adapter_bytes()[dtype]
        assert size["file"] == path.stat().st_size
        assert size["payload"] == report.trainable * torch.finfo(getattr(torch, dtype)).bits // 8
        assert abs(meta.adapter_bytes()[dtype]["file"] - size["file"]) <= 16  # only the |W| digits differ


def test_safetensors_size_matches_the_library():
    from safetensors.torch import save

    tensors = {"b": torch.zeros(3, 5), "a.weight": torch.zeros(7, 2), "c": torch.zeros(1)}
    for dtype in ("float32", "bfloat16"):
        blob = save({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, metadata={"k": 'v "quoted"'})
        got = safetensors_size({k: tuple(v.shape) for k, v in tensors.items()}, dtype, {"k": 'v "quoted"'})
        assert got["file"] == len(blob)
        assert got["header"] == 8 + int.from_bytes(blob[:8], "little")


# ---- spec resolution and errors -------------------------------------------------------------------

def test_a_config_json_path_and_a_model_directory(tmp_path, tiny_model_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 100}))
    report = count_spec(str(config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert report.trainable == 2 * 2 * (64 + 64)
    model = meta_model(str(tiny_model_dir))
    assert next(model.parameters()).is_meta
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]  # q k v o gate up down
    assert count_model(model, LoraConfig(r=2)).trainable == 2 * sum(2 * (o + i) for o, i in shapes)  # 2 blocks


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ModelLoadError) as err:
        load_spec_config("llama-2-8b")
    assert "llama-2-7b" in str(err.value) and "Did you mean" in str(err.value)
    assert all(p in str(err.value) for p in PRESETS)


@pytest.mark.parametrize("text, needle", [
    ('{"model_type": "no-such-architecture"}', "no-such-architecture"),
    ("{not json", "JSON"),
])
def test_a_config_transformers_cannot_read_names_its_error(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ModelLoadError) as err:
        load_spec_config(str(path))
    assert str(path) in str(err.value) and "transformers cannot read" in str(err.value)
    assert needle.lower() in str(err.value).lower()


def test_r_larger_than_a_matrix_names_the_module():
    with pytest.raises(TargetError, match=r"transformer\.h\.0\.attn\.c_attn.*r must be <= 768"):
        count_spec("gpt2", LoraConfig(r=1000, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"r=65 is larger than the 64x4096 matrix allows: d \(out\) is 64"):
        shape_count(64, 4096, 65)


def test_table_lists_roles_totals_and_sizes():
    text = format_count(count_spec("llama-2-7b", LoraConfig(r=8)), "llama-2-7b")
    assert "model.layers.*.mlp.down_proj" in text and "4096x11008" in text
    assert "19,988,480 of 6,758,404,096" in text and "0.2958%" in text
    assert "bfloat16" in text and "meta device" in text


# ---- the CLI --------------------------------------------------------------------------------------

def test_cli_count(capsys):
    from lorakit.cli.main import main

    assert main(["count", "--shape", "4096x4096", "--r", "8"]) == 0
    assert "65,536 (0.39% of full)" in capsys.readouterr().out
    assert main(["count", "llama-2-7b", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["trainable"], doc["total"]) == (19_988_480, 6_758_404_096)
    assert doc["adapter_bytes"]["float16"]["payload"] == 2 * 19_988_480
    assert main(["count", "qwen2-0.5b", "--r", "24", "--target-modules", "q_proj", "v_proj"]) == 0
    assert "model.layers.*.self_attn.v_proj" in capsys.readouterr().out
    assert main(["count", "llama-9b"]) == 2
    assert "Presets: bert-base, gemma-2b" in capsys.readouterr().err
    assert main(["count", "--shape", "64by64"]) == 2
    assert "expected DxK" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(use_dora=True), dict(bias="all"), dict(bias="lora_only", use_dora=True)], ids=str)
def test_count_includes_dora_magnitudes_and_trained_biases(kw, tmp_path):
    """The planner's count and file keys equal those of the adapter inject + save_adapter really make."""
    from safetensors import safe_open

    from lorakit.lora.adapters import trainable_report

    cfg = dict(r=4, target_modules=["q_proj", "o_proj", "up_proj"], **kw)
    report = count_model(tiny_qwen2(), LoraConfig(**cfg))
    model = inject(tiny_qwen2(), LoraConfig(**cfg))
    assert report.trainable == trainable_report(model).trainable
    save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == report.saved
