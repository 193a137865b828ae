"""LoraConfig checks and the adapter_config.json format PEFT reads."""

import json
import warnings

import pytest

import lorakit as lk


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"r": 2.5}, "r must be an integer"),
    ({"lora_alpha": 0}, "lora_alpha must be a number > 0"),
    ({"lora_dropout": 1.0}, "0 <= p < 1"),
    ({"lora_dropout": -0.1}, "0 <= p < 1"),
    ({"bias": "some"}, "bias must be one of none, all, lora_only"),
    ({"init_lora_weights": "corda"}, "init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_"}, "init_lora_weights"),
    ({"use_dora": "yes"}, "use_dora"),
    ({"target_modules": []}, "must not be an empty list"),
    ({"target_modules": None}, "target_modules is required"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"),
])
def test_bad_values_name_the_field(kwargs, words):
    with pytest.raises(lk.ConfigError, match=words):
        lk.LoraConfig(**kwargs)


def test_error_is_a_value_error():
    assert issubclass(lk.LorakitError, ValueError)
    with pytest.raises(ValueError):
        lk.LoraConfig(r=-1)


def test_all_linear_is_case_insensitive():
    assert lk.LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"


def test_rank_and_alpha_pattern_follow_peft():
    from peft.utils.other import get_pattern_key

    cfg = lk.LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                        alpha_pattern={"v_proj": 3})
    for name, r in [("model.layers.0.self_attn.q_proj", 4), ("model.layers.1.mlp.down_proj", 2),
                    ("model.layers.0.mlp.down_proj", 8), ("model.layers.0.self_attn.xq_proj", 8)]:
        assert cfg.rank_for(name) == r
        key = get_pattern_key(cfg.rank_pattern.keys(), name)
        assert cfg.rank_pattern.get(key, cfg.r) == r
    assert cfg.alpha_for("a.v_proj") == 3 and cfg.alpha_for("a.k_proj") == 16


def test_peft_reads_our_config(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig

    cfg = lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        use_rslora=True, rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    (tmp_path / "adapter_config.json").write_text(cfg.to_json())
    peft_cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(peft_cfg, PeftLoraConfig)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, peft_cfg.use_rslora) == (4, 8, 0.1, True)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"} and peft_cfg.rank_pattern == {"v_proj": 2}


def test_we_read_peft_config_and_warn_on_unknown_keys():
    from peft import LoraConfig as PeftLoraConfig

    data = PeftLoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True).to_dict()
    data = json.loads(json.dumps(data, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = lk.LoraConfig.from_peft_dict(data)
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.target_modules) == (16, 32, True, ["q_proj"])
    with pytest.warns(UserWarning, match="from_a_future_peft"):
        lk.LoraConfig.from_peft_dict({**data, "from_a_future_peft": 1})


@pytest.mark.parametrize("patch, words", [
    ({"lora_bias": True}, "lora_bias"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
    ({"r": "eight"}, "r must be an integer"),
])
def test_unsupported_peft_configs_refused(patch, words):
    with pytest.raises(lk.ConfigError, match=words):
        lk.LoraConfig.from_peft_dict({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **patch})


def test_target_modules_flags_mean_the_same_for_every_verb():
    from lorakit.lora.config import target_modules_from_flags

    assert target_modules_from_flags(["All-Linear"]) == "All-Linear"  # LoraConfig lower-cases it
    assert target_modules_from_flags([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"  # one regex stays a regex
    assert target_modules_from_flags(["q_proj"]) == ["q_proj"]
    assert target_modules_from_flags(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
