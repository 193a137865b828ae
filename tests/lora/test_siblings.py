"""Fused sibling adapters (lorakit.siblings) compute what one adapter at a time computes."""

import pytest
import torch
from builders import tiny_llama
from torch import nn

import lorakit as lk
from lorakit.lora import ops, siblings


@pytest.fixture
def unfused(monkeypatch):
    def run(fn):
        monkeypatch.setattr(siblings, "enabled", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(siblings, "enabled", True)
    return run


def _lora_model(dtype=torch.float32, dropout=0.0):
    model = tiny_llama().to(dtype)
    return lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                          init_lora_weights=False))


def test_groups_are_the_projections_reading_one_input():
    model = _lora_model()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.siblings == (attn.k_proj, attn.q_proj, attn.v_proj)
    assert mlp.gate_proj.siblings is mlp.up_proj.siblings and len(mlp.up_proj.siblings) == 2
    assert attn.o_proj.siblings == () and mlp.down_proj.siblings == ()
    lk.merge_and_unload(model)
    assert not any(isinstance(m, lk.LoraLinear) for m in model.modules())


def _two_steps(model, ids):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses, grads = [], None
    for step in range(2):
        torch.manual_seed(100 + step)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize(("dtype", "dropout"), [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_fused_training_equals_one_adapter_at_a_time(unfused, ids, dtype, dropout):
    fused = _two_steps(_lora_model(dtype, dropout).train(), ids)
    plain = unfused(lambda: _two_steps(_lora_model(dtype, dropout).train(), ids))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(torch.tensor(fused[0]), torch.tensor(plain[0]), **tol)
    assert fused[1].keys() == plain[1].keys()
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], **tol, msg=name)


def test_one_matmul_per_distinct_input(monkeypatch, unfused, ids):
    calls = []
    real = ops._LoraDown.apply
    monkeypatch.setattr(ops._LoraDown, "apply", lambda *a: calls.append(len(a) - 3) or real(*a))
    model = _lora_model(torch.bfloat16)  # a bf16 input always takes _LoraDown (it upcasts)
    layers = len(model.model.layers)
    model(input_ids=ids)
    assert calls == [3, 1, 2, 1] * layers  # q/k/v together, o alone, gate/up together, down alone
    calls.clear()
    unfused(lambda: model(input_ids=ids))
    assert calls == [1] * 7 * layers


class CrossAttention(nn.Module):
    """q reads x, k and v read other states: the q/k/v name guess is wrong here."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, memory):
        return self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory)


def test_a_wrong_sibling_guess_costs_work_not_correctness(unfused):
    torch.manual_seed(0)
    model = lk.inject(CrossAttention(), lk.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"],
                                                      init_lora_weights=False))
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    out = model(x, memory)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = unfused(lambda: model(x, memory))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_siblings_with_different_settings_run_alone(ids):
    """A sibling with another dropout, several active adapters or a merged adapter is not fused."""
    model = _lora_model().train()
    attn = model.model.layers[0].self_attn
    attn.k_proj.adapters["default"].dropout = 0.3
    assert siblings._fusable(attn.k_proj, True, 0.0, attn.q_proj.lora_A["default"].weight) is None
    assert siblings._fusable(attn.k_proj, True, 0.3, attn.q_proj.lora_A["default"].weight) == "default"
    model.eval()
    assert siblings._fusable(attn.k_proj, False, 0.0, attn.q_proj.lora_A["default"].weight) == "default"
    attn.v_proj.merge(["default"])
    assert siblings._fusable(attn.v_proj, False, 0.0, attn.q_proj.lora_A["default"].weight) is None
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["k_proj"]), "second")
    lk.set_active(model, ["default", "second"])
    assert siblings._fusable(attn.k_proj, False, 0.0, attn.q_proj.lora_A["default"].weight) is None


def test_a_new_wrapper_keeps_the_mode_of_the_module_it_wraps():
    model = _lora_model()  # tiny_llama is in eval mode
    assert not any(m.training for m in model.modules())
