"""lean_layers: transformers' RMSNorm and gated SiLU MLP through Functions that keep less for backward. Against
the same model unchanged: outputs and every gradient equal bit for bit, and what autograd keeps is smaller by
exactly the fp32 copy of each norm's input (bf16) and silu's output of each MLP."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.models.lean import lean_layers

ROWS, T = 2, 12


def _model(make, dtype):
    model = make().to(dtype).train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = (1 + 0.3 * torch.randn_like(p, dtype=torch.float32)).to(dtype)  # not all ones
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _run(model, train_norms=False):
    """Logits and the gradients of a fixed function of them; the final norm and the embeddings train too when
    ``train_norms`` (the norm's weight gradient and every norm input needing a gradient)."""
    if train_norms:
        model.get_input_embeddings().weight.requires_grad_(True)
        model.model.norm.weight.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (ROWS, T), generator=torch.Generator().manual_seed(2))
    logits = model(ids).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(logits.dtype)
    (logits.float() * w.float()).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("train_norms", [False, True], ids=["frozen", "norms-train"])
def test_lean_layers_equal_transformers_bit_for_bit(make, dtype, train_norms):
    plain = _model(make, dtype)
    lean = copy.deepcopy(plain)
    layers = plain.config.num_hidden_layers
    assert lean_layers(lean) == {"rms_norm": 2 * layers + 1, "mlp": layers}
    want_logits, want = _run(plain, train_norms)
    got_logits, got = _run(lean, train_norms)
    assert torch.equal(got_logits, want_logits)
    assert want.keys() == got.keys() and ("model.norm.weight" in want) == train_norms
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _saved_bytes(model) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward during one forward."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (ROWS, T), generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.float().sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lean_layers_keep_less_by_the_norms_fp32_copies_and_silus_outputs(dtype):
    plain = _model(tiny_llama, dtype)
    lean = copy.deepcopy(plain)
    lean_layers(lean)
    cfg, tokens = plain.config, ROWS * T
    # the first block's input norm reads the frozen embeddings' output: no gradient, nothing kept either way
    norms = 2 * cfg.num_hidden_layers  # the others: an fp32 copy (4 B a number) becomes the bf16 input (2 B)
    per_norm = tokens * cfg.hidden_size * (4 - 2) if dtype == torch.bfloat16 else 0  # fp32: the copy is the input
    per_mlp = tokens * cfg.intermediate_size * dtype.itemsize  # silu(gate), recomputed in backward
    assert _saved_bytes(plain) - _saved_bytes(lean) == norms * per_norm + cfg.num_hidden_layers * per_mlp


def test_only_forwards_the_same_as_the_replicated_ones_are_changed():
    gpt2 = tiny_gpt2()  # LayerNorm and a GELU MLP: nothing to change
    assert lean_layers(gpt2) == {"rms_norm": 0, "mlp": 0}
    model = tiny_llama(hidden_act="gelu")  # the gated MLP of another activation keeps its forward
    assert lean_layers(model) == {"rms_norm": 5, "mlp": 0}
    assert lean_layers(model) == {"rms_norm": 0, "mlp": 0}  # a second call changes nothing more
    other = tiny_llama()
    assert "forward" not in vars(other.model.norm)  # instances only: another model of the class is untouched
