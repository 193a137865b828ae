"""lorakit.analysis: spectra of ΔW from adapters and from two checkpoints.

References: a ΔW built with a known spectrum (W_tuned = W_base + U·diag(s)·Vᵀ), whose energies,
ranks and norms follow by hand, and the dense SVD of each adapter's scaling·B·A.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from builders import tiny_llama

import lorakit as lk
from lorakit.analysis.report import format_table, save_plots
from lorakit.analysis.svd import (
    analyze_adapter,
    analyze_models,
    effective_rank,
    energy_at,
    lowrank_singular_values,
    rank_for_energy,
    recommend_rank,
    stable_rank,
)
from lorakit.models.modeldir import WeightDir

S = torch.tensor([3.0, 2.0, 1.0, 0.5])  # Σσ² = 14.25: energies 9, 13, 14, 14.25 (/14.25)
EXPECTED_ENERGY = {1: 9 / 14.25, 2: 13 / 14.25, 4: 1.0, 8: 1.0}


def known_delta(shape: tuple[int, int], s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U·diag(s)·Vᵀ with orthonormal U (out, n), V (in, n)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(s), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(s), generator=gen))
    return u @ torch.diag(s) @ v.T


# spectra placed in the tuned copy: module → singular values
SPECTRA = {
    "model.layers.0.self_attn.q_proj": S,
    "model.layers.1.self_attn.q_proj": torch.tensor([1.0]),
    "model.layers.0.mlp.down_proj": torch.tensor([2.0, 2.0, 2.0]),
    "model.layers.1.mlp.down_proj": torch.tensor([4.0, 1.0]),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base dir, tuned dir, base model): tuned = base + known ΔW in SPECTRA, plus one changed norm."""
    root = tmp_path_factory.mktemp("pair")
    base = tiny_llama()
    save_known_pair(base, root)
    return root / "base", root / "tuned", base


def save_known_pair(base, root) -> None:
    """Write root/base and root/tuned = base + the known ΔW of SPECTRA, with the final norm scaled by 1.5."""
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, s) in enumerate(SPECTRA.items()):
            w = tuned.get_submodule(name).weight
            w.add_(known_delta(tuple(w.shape), s, seed=i))
        tuned.model.norm.weight.mul_(1.5)
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")


def test_metrics_of_a_known_spectrum():
    for k, e in EXPECTED_ENERGY.items():
        assert energy_at(S, k) == pytest.approx(e, abs=1e-12)
    assert [rank_for_energy(S, p) for p in (0.90, 0.95, 0.99, 1.0)] == [2, 3, 4, 4]
    assert rank_for_energy(S, 9 / 14.25) == 1  # exactly reached counts
    assert stable_rank(S) == pytest.approx(14.25 / 9)
    p = S / S.sum()
    assert effective_rank(S) == pytest.approx(math.exp(-float((p * p.log()).sum())))
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    with pytest.raises(lk.ConfigError, match="energy"):
        rank_for_energy(S, 1.5)


@pytest.mark.parametrize("shape", [(40, 4, 24), (3, 8, 10), (12, 6, 2)])  # (d, r, k): r below and above d, k
def test_lowrank_singular_values_equal_dense_svd(shape):
    d, r, k = shape
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(d, r, generator=gen), torch.randn(r, k, generator=gen)
    dense = torch.linalg.svdvals((0.7 * b @ a).double())[: min(d, k, r)]
    assert torch.allclose(lowrank_singular_values(b, a, 0.7), dense, atol=1e-10)


def test_models_known_spectra_energies_and_ranks(pair):
    base_dir, tuned_dir, base = pair
    result = analyze_models(base_dir, tuned_dir, progress=False)
    assert [m.name for m in result.modules] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                                "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert len(result.unchanged) == 2 * 7 + 1 + 1 - 4  # 14 block matrices + embed_tokens + lm_head
    assert list(result.other_changed) == ["model.norm.weight"]
    assert result.other_changed["model.norm.weight"] == pytest.approx(0.5, abs=1e-6)
    stats = {m.name: m for m in result.modules}
    for name, s in SPECTRA.items():
        m = stats[name]
        assert torch.allclose(m.singular_values[: len(s)], s.double(), atol=1e-5)
        assert m.singular_values[len(s):].abs().max() < 1e-5
        w = base.get_submodule(name).weight.detach()
        assert m.summary()["relative_norm"] == pytest.approx(float(s.norm() / w.norm()), rel=1e-5)
    q0 = stats["model.layers.0.self_attn.q_proj"].summary()
    for k, e in EXPECTED_ENERGY.items():
        assert q0["energy"][k] == pytest.approx(e, abs=1e-6)
    assert (q0["k90"], q0["k95"], q0["k99"]) == (2, 3, 4)
    assert q0["stable_rank"] == pytest.approx(14.25 / 9, rel=1e-5)
    flat = stats["model.layers.0.mlp.down_proj"].summary()
    assert flat["effective_rank"] == pytest.approx(3.0, rel=1e-4) and flat["k90"] == 3


def test_aggregates_and_rank_recommendation(pair):
    result = analyze_models(*pair[:2], progress=False)
    by_type, by_layer = result.by_type(), result.by_layer()
    assert set(by_type) == {"q_proj", "down_proj"} and set(by_layer) == {0, 1}
    assert by_type["q_proj"]["modules"] == 2
    assert by_type["q_proj"]["energy"][1] == pytest.approx((9 / 14.25 + 1) / 2, abs=1e-6)
    assert by_type["down_proj"]["k95"] == pytest.approx((3 + 2) / 2)  # median of 3 and 2
    assert by_layer[1]["energy"][1] == pytest.approx((1 + 16 / 17) / 2, abs=1e-6)
    # q_proj needs k95 = 3 and 1; down_proj 3 and 2: with two modules the majority needs both
    assert recommend_rank(result, 0.95) == {"down_proj": 3, "q_proj": 3}
    assert recommend_rank(result, 0.5) == {"down_proj": 2, "q_proj": 1}


def test_report_table_json_and_plots(pair, tmp_path):
    import json

    result = analyze_models(*pair[:2], progress=False)
    table = format_table(result)
    assert "q_proj" in table and "model.layers.1.mlp.down_proj" in table and "E@8" in table
    data = json.loads(json.dumps(result.to_dict()))
    assert data["modules"][0]["k95"] == 3 and len(data["modules"][0]["singular_values"]) == 32  # min(32, 48)
    assert len(result.to_dict(max_values=2)["modules"][0]["singular_values"]) == 2
    written = save_plots(result, tmp_path / "plots")
    assert [p.name for p in written] == ["spectra.png", "k95_heatmap.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_sharded_checkpoint_reads_like_one_file(pair, tmp_path):
    base_dir, tuned_dir, base = pair
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert WeightDir(tmp_path / "sharded").shapes == WeightDir(base_dir).shapes
    one = analyze_models(base_dir, tuned_dir, progress=False)
    two = analyze_models(tmp_path / "sharded", tuned_dir, progress=False)
    assert [m.name for m in one.modules] == [m.name for m in two.modules]


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_spectra_match_dense_svd_of_scaled_ba(pair, tmp_path, rslora):
    base_dir, _, _ = pair
    model = tiny_llama()
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=rslora,
                        init_lora_weights=False)
    lk.inject(model, cfg)
    lk.save_adapter(model, tmp_path / "adapter")
    result = analyze_adapter(tmp_path / "adapter", base=base_dir)
    assert len(result.modules) == 2 * 3 + 1
    for m in result.modules:
        layer = model.get_submodule(m.name)
        delta = layer.delta_weight("default").detach().double()
        assert tuple(delta.shape) == m.shape
        dense = torch.linalg.svdvals(delta)[: len(m.singular_values)]
        assert torch.allclose(m.singular_values, dense, rtol=1e-6, atol=1e-9), m.name
        w = layer.base_layer.weight
        assert m.summary()["relative_norm"] == pytest.approx(float(delta.norm() / w.double().norm()), rel=1e-6)
    assert analyze_adapter(tmp_path / "adapter").modules[0].base_norm is None


def test_fresh_adapter_is_all_unchanged(tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0
    lk.save_adapter(model, tmp_path / "a")
    result = analyze_adapter(tmp_path / "a")
    assert result.modules == [] and len(result.unchanged) == 2


def test_mismatched_models_name_the_first_differing_tensor(pair, tmp_path):
    tiny_llama(intermediate_size=40).save_pretrained(tmp_path / "other")
    with pytest.raises(lk.ModelLoadError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*\(32, 48\) in base "
                                                r"and \(32, 40\) in tuned"):
        analyze_models(pair[0], tmp_path / "other", progress=False)
    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path / "short")
    with pytest.raises(lk.ModelLoadError, match=r"'model\.layers\.1\..*in base and absent in tuned"):
        analyze_models(pair[0], tmp_path / "short", progress=False)


def test_bad_paths_are_clear_errors(pair, tmp_path):
    with pytest.raises(lk.ModelLoadError, match="no such file or directory"):
        analyze_models(tmp_path / "missing", pair[1])
    (tmp_path / "pickled").mkdir()
    tiny_llama().config.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(lk.ModelLoadError, match="pickle"):
        analyze_models(pair[0], tmp_path / "pickled")
    with pytest.raises(lk.ModelLoadError, match="not a local path"):
        analyze_models("someorg/somemodel", pair[1])
    (tmp_path / "broken").mkdir()
    tiny_llama().config.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(lk.ModelLoadError, match="model.safetensors"):
        analyze_models(pair[0], tmp_path / "broken")
    with pytest.raises(lk.AdapterFormatError, match="not an adapter directory"):
        analyze_adapter(tmp_path / "nothing")


def test_adapter_for_another_base_is_refused(tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "a")
    tiny_llama(intermediate_size=40).save_pretrained(tmp_path / "other")
    with pytest.raises(lk.ShapeMismatchError, match="down_proj.*32x48.*another model"):
        analyze_adapter(tmp_path / "a", base=tmp_path / "other")


def test_cli_analyze(pair, tmp_path, capsys):
    import json

    from lorakit.cli.main import main

    base_dir, tuned_dir, _ = pair
    assert main(["analyze", "--base", str(base_dir), "--tuned", str(tuned_dir), "--plots", str(tmp_path / "p"),
                 "--json", "--recommend-rank", "0.95"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rank_pattern"] == {"down_proj": 3, "q_proj": 3} and len(out["modules"]) == 4
    assert (tmp_path / "p" / "k95_heatmap.png").is_file()
    assert main(["analyze", "--base", str(base_dir), "--tuned", str(tuned_dir), "--recommend-rank", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out) == {"down_proj": 2, "q_proj": 1}
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "a")
    assert main(["analyze", str(tmp_path / "a")]) == 0
    assert "model.layers.1.self_attn.q_proj" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "a"), "--tuned", str(tuned_dir)]) == 2
    assert "give an ADAPTER_DIR" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "a"), "--recommend-rank", "95"]) == 2
    assert "energy must be a fraction" in capsys.readouterr().err
