"""lorakit.plan / gpus / plan_report: rows against hand-computed values, activations against autograd."""

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import inject
from lorakit.plan.arch import read_arch
from lorakit.plan.count import build_meta_model, count_model
from lorakit.plan.gpus import GPUS, fits, parse_count, run_cost, select_gpus, training_flops
from lorakit.plan.inputs import PlanInputs
from lorakit.plan.memory import NF4_BYTES, block_targets, layer_terms, plan_memory
from lorakit.plan.report import build_plan, format_plan

# The tiny config every hand computation below uses: h=64, ffn=160, 2 blocks, 4 heads of 16, 2 kv heads.
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
N = 64_000 + 2 * 43_136 + 64 + 64_000  # embeddings + 2 blocks (q 4096, k v 2048, o 4096, MLP 3×10240, norms 128)
N_LORA = 2 * (4 * 128 + 2 * 4 * 96 + 4 * 128 + 3 * 4 * 224)  # r=4 on q, k, v, o, gate, up, down of 2 blocks


def _tiny(lora=None, **inputs):
    model = build_meta_model(LlamaConfig(**TINY))
    count = count_model(model, lora or LoraConfig(r=4))
    plan = plan_memory(read_arch(model), count, PlanInputs(**{"batch_size": 2, "seq_len": 16,
                                                                "dtype": "float32", **inputs}))
    return plan, count


def _row(plan, name, mode):
    return plan.rows[name][mode].bytes


def test_hand_computed_rows_full_fine_tuning():
    plan, count = _tiny()
    assert plan.arch.params == N and count.trainable == N_LORA == 8960
    assert _row(plan, "weights", "full") == _row(plan, "gradients", "full") == 4 * N
    assert _row(plan, "optimizer", "full") == 8 * N  # AdamW: exp_avg + exp_avg_sq
    # per token per block, fp32: norms 2·(4h + 4 + 4h), attention 4·(q + 4 repeated kv heads·16 ·2 + out) + 4·heads,
    # mask 4·T, MLP 4·2·ffn (act in and up: models.lean recomputes act out), linear inputs 4·(2h + ffn)
    per_token = 2 * (256 + 4 + 256) + (4 * (64 + 128 + 64) + 16) + 4 * 16 + 4 * 2 * 160 + 4 * (128 + 160)
    assert per_token == 4568
    assert _row(plan, "activations", "full") == 2 * 32 * per_token
    # fused head + loss: hidden-state gradient P·h·4 + one chunk of logits + the head's fp32 gradient + final norm
    logits = 32 * 64 * 4 + 32 * 1000 * 4 + 4 * 1000 * 64 + 32 * 516
    assert _row(plan, "logits", "full") == logits
    start = 2 * 32 * per_token + logits + 4 * 64_000  # + the head's gradient in the model dtype
    end = 4 * N + 4 * N  # gradients + the foreach AdamW temporary (one tensor the size of all weights)
    assert _row(plan, "peak", "full") == 4 * N + 8 * N + max(start, end)


def test_hand_computed_rows_lora_and_qlora():
    plan, _ = _tiny()
    assert _row(plan, "weights", "lora") == 4 * N + 4 * N_LORA  # adapters are fp32
    assert _row(plan, "gradients", "lora") == 4 * N_LORA and _row(plan, "optimizer", "lora") == 8 * N_LORA
    # norms keep x and rsqrt only (frozen weight); adapted inputs: attention in, MLP in, MLP out (fp32, shared),
    # o_proj's input is SDPA's output already kept; A·x (r floats) for each of the 7 modules
    per_token = 2 * (256 + 4) + 1040 + 64 + 1280 + (4 * 64 + 4 * 64 + 4 * 160 + 7 * 4 * 4)
    assert _row(plan, "activations", "lora") == 2 * 32 * per_token
    # lorakit's fused head + loss: the hidden-state gradient P·h·4, one chunk of fp32 logits (all 32 rows), final norm
    logits = 32 * 64 * 4 + 32 * 1000 * 4 + 32 * 260
    assert _row(plan, "logits", "lora") == logits
    assert _row(plan, "peak", "lora") == 4 * N + 4 * N_LORA + 8 * N_LORA + 2 * 32 * per_token + logits
    # the plain path (an architecture outside evaluate.FUSED_CE_MODELS): fp32 log-probs, their gradient, ...
    plain = plan_memory(replace(plan.arch, fused_loss=False), count_model(build_meta_model(LlamaConfig(**TINY)),
                        LoraConfig(r=4)), plan.inputs)
    assert _row(plain, "logits", "lora") == 12 * 32 * 1000 + 32 * 260
    assert _row(plain, "peak", "lora") == _row(plan, "peak", "lora") - logits + 12 * 32 * 1000 + 32 * 260
    linear = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 10240)  # everything but the head is quantized
    assert _row(plan, "weights", "qlora") == pytest.approx(linear * NF4_BYTES + (N - linear) * 4 + 4 * N_LORA)
    assert linear * NF4_BYTES == 44_373  # 4 bits + an 8-bit absmax per 64 + an fp32 scale per 256 blocks
    assert plan.ratio("lora") == _row(plan, "peak", "lora") / _row(plan, "peak", "full")


def test_checkpointing_keeps_block_inputs_plus_one_recomputed_block():
    plan, _ = _tiny(grad_checkpointing=True)
    assert _row(plan, "activations", "full") == 2 * 32 * 64 * 4 + 32 * 4568


def test_blocks_below_the_first_adapter_keep_nothing():
    plan, _ = _tiny(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    per_token = 2 * (256 + 4) + 1040 + 64 + 1280 + 4 * 64 + 2 * 4 * 4
    assert _row(plan, "activations", "lora") == 32 * per_token
    assert "blocks 0..0 keep nothing" in plan.rows["activations"]["lora"].formula


def test_sgd_has_no_state_and_cpu_adamw_temporaries_follow_the_largest_tensor():
    plan, _ = _tiny(optimizer="sgd")
    assert _row(plan, "optimizer", "full") == 0
    assert _row(plan, "peak", "full") == 4 * N + max(2 * 32 * 4568 + 408_704 + 256_000, 4 * N)
    cpu, _ = _tiny(device="cpu")
    assert _row(cpu, "peak", "full") == 12 * N + max(2 * 32 * 4568 + 408_704 + 256_000, 4 * N + 2 * 4 * 64_000)


def test_flops_per_token():
    model = build_meta_model(LlamaConfig(**TINY))
    flops = training_flops(read_arch(model), N_LORA, seq_len=16)
    matmul = 2 * 43_008 + 64_000  # Linear weights, the head included
    attention = 3 * 2 * 2 * 2 * 64 * 8  # fwd+bwd × blocks × 2 matmuls × 2 FLOPs × q_dim × T/2 keys
    assert flops.full == 6 * matmul + attention
    assert flops.lora == 4 * matmul + 6 * N_LORA + attention
    half = training_flops(read_arch(model), N_LORA, seq_len=16, label_fraction=0.5)
    assert half.full == flops.full - 6 * 32_000  # logits at half the positions


# ---- activations equal what autograd keeps -----------------------------------------------------

def _saved_bytes_per_block(model, ids, mask) -> dict[int, int]:
    """Bytes of the tensors each block saves for backward (storages first seen there; weights excluded)."""
    owners = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen, current, hooks = {}, [None], []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owners and ptr not in seen:
            seen[ptr] = (current[0], t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    out: dict[int, int] = {}
    for block, nbytes in seen.values():
        if block is not None:
            out[block] = out.get(block, 0) + nbytes
    return out


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_block_activations_equal_autograd_saved_tensors(dtype, mode, padded, lora_dropout, lean):
    """lean: the norms and MLP as the trainer runs them (models.lean); transformers: its own forwards."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from lorakit.models.lean import lean_layers

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 3})).to(getattr(torch, dtype)).train()
    cfg = LoraConfig(r=4, target_modules="all-linear", lora_dropout=lora_dropout)
    count = count_model(model, cfg)
    arch = read_arch(model)
    assert arch.lean_norm and arch.lean_mlp
    if lean:
        lean_layers(model)
    else:
        arch = replace(arch, lean_norm=False, lean_mlp=False)
    if mode == "lora":
        inject(model, cfg)
    else:
        model.requires_grad_(True)
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    if padded:
        mask[1, -5:] = 0  # a padded row, as collate makes them: SDPA gets a mask, k and v are repeated
    saved = _saved_bytes_per_block(model, ids, mask)
    inputs = PlanInputs(batch_size=2, seq_len=16, dtype=dtype, padded=padded)
    terms = layer_terms(arch, inputs, mode, block_targets(arch, count.targets)[1], lora_dropout=lora_dropout)
    predicted = sum(terms.values()) * 32
    assert saved[1] == predicted  # block 1: shared tensors (rotary tables) were first seen in block 0


# ---- GPUs, cost, the document ---------------------------------------------------------------------

def test_gpu_presets_prices_and_verdicts():
    assert list(GPUS) == ["T4", "RTX-3090", "RTX-4090", "A100-40GB", "A100-80GB", "H100", "H200"]
    chosen = select_gpus(["h100", "T4"], ["1.0", "H100=2.0"])
    assert [(g.name, g.price_per_hour) for g in chosen] == [("H100", 2.0), ("T4", 1.0)]
    with pytest.raises(ConfigError, match="unknown GPU 'V100'.*A100-80GB"):
        select_gpus(["V100"])
    with pytest.raises(ConfigError, match="--price"):
        select_gpus(None, ["H100=cheap"])
    h100 = GPUS["H100"]
    assert fits((79.6 - 1.0) * 2**30, h100) and not fits(79 * 2**30, h100)
    cost = run_cost(6e9, 1e9, h100, "bfloat16", 0.5)
    assert cost["hours"] == pytest.approx(6e18 / (989.4e12 * 0.5) / 3600)
    assert cost["cost_usd"] == pytest.approx(cost["hours"] * 2.5)
    assert parse_count("500M") == 5e8 and parse_count("1.5B") == 1.5e9 and parse_count("2e3") == 2000
    with pytest.raises(ConfigError):
        parse_count("lots")


def test_plan_document_and_explain():
    model = build_meta_model(LlamaConfig(**TINY))
    count = count_model(model, LoraConfig(r=4))
    doc = build_plan(model, count, PlanInputs(batch_size=2, seq_len=16), select_gpus(["T4", "H100"]), 1e6, 0.4)
    assert set(doc["memory"]) == {"full", "lora", "qlora"}
    assert doc["memory"]["lora"]["gradients"] == 4 * N_LORA
    assert [g["name"] for g in doc["gpus"]] == ["T4", "H100"] and doc["gpus"][1]["modes"]["full"]["fits"]
    text = format_plan(doc, "tiny", explain=True)
    assert "fused head + loss" in text and "N·e = 214,336 × 2 B" in text and "assumptions:" in text


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float64"}, "dtype"), ({"optimizer": "adam8bit"}, "optimizer"), ({"batch_size": 0}, "batch_size"),
    ({"label_fraction": 0}, "label_fraction"), ({"device": "tpu"}, "device"),
])
def test_bad_plan_inputs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PlanInputs(**kwargs)


def test_cli_plan(capsys):
    import json

    from lorakit.cli.main import main

    assert main(["plan", "qwen2-0.5b", "--r", "24", "--gpus", "T4", "H100", "--tokens", "50M", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["lora"]["trainable"] == 13_197_312 and doc["tokens"] == 5e7
    assert doc["memory"]["lora"]["gradients"] == 4 * 13_197_312  # fp32 adapter gradients
    assert main(["plan", "llama-2-7b", "--explain", "--grad-checkpointing", "--dtype", "float16"]) == 0
    text = capsys.readouterr().out
    assert "checkpointed: 32 blocks" in text and "H200" in text and "ratio to full FT" in text
    assert main(["plan", "gpt2", "--gpus", "V100"]) == 2
    assert "unknown GPU 'V100'" in capsys.readouterr().err


def test_a_model_without_a_transformers_config_is_refused():
    from builders import tiny_tts

    with pytest.raises(ConfigError, match="TinyTTS: the planner reads hidden_size"):
        read_arch(tiny_tts())


def test_nproc_ddp_and_fsdp_per_device_memory():
    """DDP: each device holds everything plus gradient buckets and 1/N of the batch; FSDP: 1/N of the states."""
    import lorakit as lk
    from lorakit.plan.arch import read_arch
    from lorakit.plan.count import count_model, meta_model
    from lorakit.plan.inputs import PlanInputs
    from lorakit.plan.memory import plan_memory

    model = meta_model("llama-2-7b")
    count = count_model(model, lk.LoraConfig(r=8, target_modules="all-linear"))
    arch = read_arch(model)
    one = plan_memory(arch, count, PlanInputs(batch_size=8, seq_len=512))
    ddp = plan_memory(arch, count, PlanInputs(batch_size=8, seq_len=512, nproc=4))
    fsdp = plan_memory(arch, count, PlanInputs(batch_size=8, seq_len=512, nproc=4, fsdp=True))
    rows = lambda p, m: {k: v[m].bytes for k, v in p.rows.items()}  # noqa: E731
    for mode in ("full", "lora"):
        a, d, f = rows(one, mode), rows(ddp, mode), rows(fsdp, mode)
        assert d["weights"] == a["weights"] and d["optimizer"] == a["optimizer"]
        assert d["gradients"] == 2 * a["gradients"]
        assert abs(d["activations"] - a["activations"] / 4) < 1e-6 * a["activations"]  # 2 rows instead of 8
        block = (arch.params - arch.head) / arch.layers * 2
        assert f["weights"] == a["weights"] / 4 + block
        assert f["gradients"] == a["gradients"] / 4 and f["optimizer"] == a["optimizer"] / 4
    assert fsdp.total("full") < ddp.total("full")


def test_quantize_switch_sets_the_quantized_column_bytes():
    linear = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 10240)
    rest = N - linear
    for method, dq, per_weight in [("nf4", True, NF4_BYTES), ("fp4", False, 0.5 + 4 / 64), ("int8", True, 1 + 4 / 64)]:
        plan, _ = _tiny(quantize=method, double_quant=dq)  # int8: an fp32 scale per output row, in = h = 64
        assert _row(plan, "weights", "qlora") == pytest.approx(linear * per_weight + rest * 4 + 4 * N_LORA)
    with pytest.raises(ConfigError, match="quantize"):
        PlanInputs(quantize="int4")


def test_seventy_b_qlora_fits_which_cards_at_which_batch():
    """The seeds' "70B on one consumer GPU": NF4 weights alone are ~34 GiB, so no 24 GB card fits it."""
    from lorakit.plan.count import meta_model

    model = meta_model("llama-2-70b")
    count = count_model(model, LoraConfig(r=8))
    inputs = PlanInputs(batch_size=1, seq_len=2048, grad_checkpointing=True, quantize="nf4")
    doc = build_plan(model, count, inputs, select_gpus(["RTX-4090", "A100-40GB", "A100-80GB"]), 1e6, 0.4, grid=True)
    assert 33 * 2**30 < doc["memory"]["qlora"]["weights"] < 36 * 2**30
    fit = doc["fit"]
    assert set(fit["RTX-4090"].values()) == {0}
    assert fit["A100-80GB"][2048] >= 1 and fit["A100-80GB"][512] >= fit["A100-80GB"][4096]
    for gpu in select_gpus(["A100-40GB", "A100-80GB"]):  # the grid's batch fits; double it does not (unless capped)
        for seq, b in fit[gpu.name].items():
            peak = plan_memory(read_arch(model), count, replace(inputs, batch_size=max(b, 1), seq_len=seq)).total("qlora")
            assert fits(peak, gpu) == (b > 0)
            if 0 < b < 128:
                peak2 = plan_memory(read_arch(model), count, replace(inputs, batch_size=2 * b, seq_len=seq))
                assert not fits(peak2.total("qlora"), gpu)
    text = format_plan(doc, "llama-2-70b")
    assert "QLoRA (nf4): the largest batch that fits" in text and "lorakit train --quantize nf4" in text
