"""lorakit.models.dtype: one parser of dtype names for every verb, one rule for what ``auto`` picks."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.models.dtype import native_bf16, parse_dtype, resolve_dtype, torch_dtype

# every accepted spelling and the torch dtype it must mean (torch's own objects are the reference)
SPELLINGS = {
    torch.float32: ["float32", "fp32", "f32", "FP32", "torch.float32", "float", torch.float32],
    torch.bfloat16: ["bfloat16", "bf16", "BF16", " bf16 ", "torch.bfloat16", torch.bfloat16],
    torch.float16: ["float16", "fp16", "f16", "half", "Float16", torch.float16],
}


@pytest.mark.parametrize("expected, spelling", [(d, s) for d, names in SPELLINGS.items() for s in names])
def test_every_spelling_names_its_torch_dtype(expected, spelling):
    assert torch_dtype(spelling) is expected
    assert getattr(torch, parse_dtype(spelling)) is expected  # the canonical name is torch's attribute name


@pytest.mark.parametrize("bad", ["fp8", "int8", "float64", "", None, torch.int8, torch.float64, "bf"])
def test_other_values_are_refused_listing_the_accepted_names(bad):
    with pytest.raises(ConfigError, match="accepted: float32, bfloat16, float16, fp32") as err:
        parse_dtype(bad)
    assert "auto" not in str(err.value)


def test_auto_only_where_allowed():
    assert parse_dtype("AUTO", allow_auto=True) == "auto"
    with pytest.raises(ConfigError, match="'auto'"):
        parse_dtype("auto")
    with pytest.raises(ConfigError):
        torch_dtype("auto")


def test_auto_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cpu") == ("bfloat16", "auto: cpu computes bf16 natively")
    assert resolve_dtype("fp16", "cpu") == ("float16", "as configured")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("auto", "cpu")[0] == "float32" and not native_bf16("cpu")
    assert resolve_dtype("auto", "mps")[0] == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def emulated_only(including_emulation=True):  # a GPU that has bf16 only by emulation (a T4)
        seen.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert resolve_dtype("auto", "cuda:1")[0] == "float32" and seen == [False]
