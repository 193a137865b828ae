"""LoRA on nn.Conv1d: the closed-form ΔW, merge/unmerge, PEFT's key names and outputs both ways, the count,
and the convolutions it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.errors import TargetError
from lorakit.plan.count import count_model

peft = pytest.importorskip("peft")
TARGETS = ["conv_pre", "proj", "conv_post"]


class Vocoderish(nn.Module):
    """Convolutions as vocoder and flow models have them: k=3 with padding, a 1x1 projection, a strided k=5."""

    def __init__(self):
        super().__init__()
        self.conv_pre = nn.Conv1d(8, 16, 3, padding=1)
        self.proj = nn.Conv1d(16, 16, 1)
        self.conv_post = nn.Conv1d(16, 4, 5, stride=2, padding=2)

    def forward(self, x):
        return self.conv_post(F.gelu(self.proj(F.gelu(self.conv_pre(x)))))


def vocoder(seed=0):
    torch.manual_seed(seed)
    return Vocoderish().eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 8, 11)


def test_forward_and_merge_match_the_closed_form_delta(x):
    model = lk.inject(vocoder(), lk.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    plain = vocoder()
    for name in TARGETS:
        layer, conv = model.get_submodule(name), plain.get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in, k), (out, r, 1)
        assert a.shape == (3, conv.in_channels, conv.kernel_size[0]) and b.shape == (conv.out_channels, 3, 1)
        delta = 2.0 * torch.stack([b[:, :, 0] @ a[:, :, t] for t in range(a.shape[2])], dim=-1)
        with torch.no_grad():
            conv.weight += delta
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        layer = model.conv_pre  # the unmerged path itself: base + scaling * B(A(x))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        two_step = layer.base_layer(x) + 2.0 * F.conv1d(F.conv1d(x, a, padding=1), b)
        torch.testing.assert_close(layer(x), two_step, atol=1e-5, rtol=0)
        before = model.conv_post.base_layer.weight.clone()
        lk.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        lk.unmerge(model)
        torch.testing.assert_close(model.conv_post.base_layer.weight, before, atol=1e-6, rtol=0)
        merged = lk.merge_and_unload(copy.deepcopy(model))
        assert type(merged.proj) is nn.Conv1d
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)


def test_peft_reads_ours_and_we_read_peft(x, tmp_path):
    cfg = dict(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False)
    ours = lk.inject(vocoder(), lk.LoraConfig(**cfg))
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(vocoder(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=0)
    assert set(theirs.state_dict()) - set(vocoder().state_dict()) == {
        f"base_model.model.{k}" for k in ours.state_dict()} - {f"base_model.model.{k}" for k in vocoder().state_dict()}

    torch.manual_seed(7)
    made = peft.get_peft_model(vocoder(), peft.LoraConfig(**cfg))
    made.save_pretrained(tmp_path / "theirs")
    loaded = lk.load_adapter(vocoder(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), made(x), atol=1e-6, rtol=0)
        merged = made.merge_and_unload()
        torch.testing.assert_close(lk.merge_and_unload(loaded)(x), merged(x), atol=1e-5, rtol=0)


def test_count_matches_peft(tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    report = count_model(vocoder(), lk.LoraConfig(**cfg))
    trainable, _ = peft.get_peft_model(vocoder(), peft.LoraConfig(**cfg)).get_nb_trainable_parameters()
    assert report.trainable == trainable == 4 * (16 + 8 * 3) + 4 * (16 + 16) + 4 * (4 + 16 * 5)
    assert {t.kind for t in report.targets} == {"conv"}
    made = lk.inject(vocoder(), lk.LoraConfig(**cfg))
    assert report.saved == {k: tuple(v.shape) for k, v in lk.read_adapter(lk.save_adapter(made, tmp_path))[1].items()}


@pytest.mark.parametrize("conv", [nn.Conv1d(8, 16, 3, groups=2), nn.Conv1d(8, 16, 3, dilation=2),
                                  nn.Conv1d(8, 16, 3, padding="same"), nn.Conv1d(8, 16, 3, padding_mode="reflect")])
def test_convolutions_merging_cannot_reproduce_are_refused(conv):
    model = nn.Sequential(conv)
    with pytest.raises(TargetError, match="groups=1, dilation=1 and integer zero padding"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is nn.Conv1d


def test_mixed_batches_refuse_conv_adapters(x):
    model = lk.inject(vocoder(), lk.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(lk.AdapterError, match="does not run Conv1d adapters"):
        with lk.mixed_batch(model, ["default", None]):
            model(x)


def test_combine_refuses_conv_adapters():
    model = lk.inject(vocoder(), lk.LoraConfig(r=2, target_modules=["proj"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["proj"]), "b")
    with pytest.raises(lk.AdapterError, match="proj is a Conv1d adapter"):
        lk.combine(model, {"a": 1.0, "b": 1.0}, "ab")
    assert lk.list_adapters(model) == ["a", "b"]
