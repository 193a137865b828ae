"""lk.mixed_batch: each row with its own adapter equals running that row alone with set_active."""

import gc

import pytest
import torch
from builders import tiny_gpt2, tiny_llama

import lorakit as lk
from lorakit.lora.layer import LoraLinear


def _three_adapters(model):
    """Adapters of different ranks, targets (one adapts the embedding) and scalings; random B."""
    specs = {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
             "b": dict(r=5, lora_alpha=3, target_modules=["o_proj", "down_proj", "embed_tokens"]),
             "c": dict(r=3, lora_alpha=8, use_rslora=True, target_modules="all-linear")}
    for name, kw in specs.items():
        lk.inject(model, lk.LoraConfig(init_lora_weights=False, **kw), name)
    return model.eval()


@torch.no_grad()
def _reference(model, ids, names):
    """Row by row, the ordinary way: activate the row's adapter (or none) and run that row alone."""
    before = lk.active_adapters(model)
    rows = []
    for i, name in enumerate(names):
        lk.set_active(model, [name] if name else [])
        rows.append(model(ids[i:i + 1]).logits)
    lk.set_active(model, before)
    return torch.cat(rows)


@torch.no_grad()
def _mixed(model, ids, names):
    with lk.mixed_batch(model, names):
        return model(ids).logits


def test_mixed_batch_equals_each_row_alone():
    model = _three_adapters(tiny_llama())
    ids = torch.randint(0, 96, (6, 7), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", None, "a", "c", "b"]
    torch.testing.assert_close(_mixed(model, ids, names), _reference(model, ids, names), rtol=0, atol=1e-5)


@torch.no_grad()
def test_set_rows_retargets_an_open_block_to_new_rows():
    """Continuous batching changes the rows between forwards: after set_rows the block computes what a
    fresh mixed_batch over the new rows computes (each row alone)."""
    from lorakit.lora.adapters import lora_layers
    from lorakit.lora.mixed import set_rows

    model = _three_adapters(tiny_llama())
    ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(3))
    with lk.mixed_batch(model, ["a", None]):
        model(ids[:2])
        names = [None, "c", "b", "a", "c"]
        set_rows([layer for _, layer in lora_layers(model)], names)
        out = model(ids).logits
    torch.testing.assert_close(out, _reference(model, ids, names), rtol=0, atol=1e-5)


def test_mixed_batch_conv1d_model_and_single_adapter_rows():
    model = tiny_gpt2()
    for name, r in (("x", 2), ("y", 4)):
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"],
                                       init_lora_weights=False), name)
    model.eval()
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(2))
    for names in (["x", "y", "y", None], ["y"] * 4, [None] * 4):
        torch.testing.assert_close(_mixed(model, ids, names), _reference(model, ids, names), rtol=0, atol=1e-5)


def test_active_adapters_are_ignored_inside_and_restored_after():
    model = _three_adapters(tiny_llama())
    lk.set_active(model, ["a", "c"])
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_mixed(model, ids, [None, None]), _reference(model, ids, [None, None]))
    assert lk.active_adapters(model) == ["a", "c"]
    assert all(m.mixed is None for m in model.modules() if isinstance(m, LoraLinear))


def test_stacks_follow_loads_deletes_and_weight_changes(tmp_path):
    model = _three_adapters(tiny_llama())
    ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["a", "c", "b"]
    _mixed(model, ids, names)  # builds the stacks
    lk.save_adapter(model, tmp_path / "a", "a")
    lk.delete_adapter(model, "a")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.stack_cache is None  # dropped with the adapter: its memory goes with it
    with pytest.raises(lk.AdapterError, match="unknown adapter"):
        _mixed(model, ids, names)
    lk.load_adapter(model, tmp_path / "a", "a2", activate=False)
    names = ["a2", "c", None]
    torch.testing.assert_close(_mixed(model, ids, names), _reference(model, ids, names), rtol=0, atol=1e-5)
    with torch.no_grad():  # an in-place change of a factor (training, a copy_) is seen too
        layer.lora_B["c"].weight.mul_(3.0)
    torch.testing.assert_close(_mixed(model, ids, names), _reference(model, ids, names), rtol=0, atol=1e-5)


def test_mixed_batch_refuses_what_it_cannot_run_exactly():
    model = _three_adapters(tiny_llama())
    ids = torch.randint(0, 96, (2, 4))
    with pytest.raises(lk.AdapterError, match=r"unknown adapter\(s\) \['zz'\]"):
        _mixed(model, ids, ["a", "zz"])
    with pytest.raises(lk.AdapterError, match="2 adapter names but the batch has 1 rows"):
        _mixed(model, ids[:1], ["a", "b"])
    with pytest.raises(lk.AdapterError, match="nested"), lk.mixed_batch(model, ["a", "b"]):
        _mixed(model, ids, ["a", "b"])
    assert all(m.mixed is None for m in model.modules() if isinstance(m, LoraLinear))
    lk.merge(model, ["a"])
    with pytest.raises(lk.AdapterError, match="unmerge"):
        _mixed(model, ids, ["a", "b"])
    lk.unmerge(model)
    model.train()
    with pytest.raises(lk.AdapterError, match="eval"):
        _mixed(model, ids, ["a", "b"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow  # 1000 cycles: 5-17 s on 2 shared cores
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_flat_over_1000_load_unload_cycles(tmp_path):
    torch.manual_seed(5)
    # 14 KB of factors (+ 14 KB stacked): leaking one adapter per cycle would add ~28 MB, over the bound
    donor = lk.inject(tiny_llama(), lk.LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.save_adapter(donor, tmp_path / "ad")
    model = tiny_llama().eval()
    ids = torch.randint(0, 96, (2, 3))

    def cycle():
        lk.load_adapter(model, tmp_path / "ad", "x", activate=False)
        with torch.no_grad(), lk.mixed_batch(model, ["x", None]):
            model(ids)
        lk.delete_adapter(model, "x")

    for _ in range(50):  # warm-up: allocator pools, lazily created wrappers
        cycle()
    gc.collect()
    start = _rss_bytes()
    for _ in range(1000):
        cycle()
    gc.collect()
    grown = _rss_bytes() - start
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 1,000 load/unload cycles"
    assert lk.list_adapters(model) == []
    assert all(m.stack_cache is None for m in model.modules() if isinstance(m, LoraLinear))
