"""The predictability study (python -m sparse_predictor.study) and its statistics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from predictor_reference import mlp_test_metrics

from sparse_predictor.stats import average_ranks, spearman
from sparse_predictor.study import QUICK, main, pieces
from sparse_predictor.synthetic import tiny_config, write_collection, write_model_dir

LAYERS = [0, 1, 2, 3]
PNGS = ["recall_vs_sparsity", "recall_vs_rank", "drift_vs_recall", "lookahead_vs_standard", "attention_heads"]


# ---- statistics ---------------------------------------------------------------------
def test_spearman_hand_computed():
    """x = 1..4, y = 1,3,2,4: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8. Of the 24 orders of y,
    |rho| >= 0.8 for the identity, the 3 adjacent swaps, the reversal and its 3 adjacent
    swaps (rho = -0.8): p = 8/24."""
    c = spearman([1, 2, 3, 4], [1, 3, 2, 4])
    assert c.rho == pytest.approx(0.8) and c.p_value == pytest.approx(8 / 24) and c.n == 4
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]).rho == pytest.approx(-1.0)


def test_ties_share_their_mean_rank():
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30, 20]), [1, 3, 3, 5, 3])
    x, y = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 3.0]
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4.5, 4.5, 3])  # by hand
    assert spearman(x, y).rho == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_spearman_matches_numpy_and_brute_force_p():
    """rho: the Pearson correlation of the ranks and 1 - 6 sum(d^2) / (n (n^2 - 1)) (no ties);
    p of 7 points: the fraction of all 7! orders of y with |rho| at least as large, counted
    here by brute force; 10 strongly related points: a small Monte Carlo p."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(10), rng.standard_normal(10)
    y = y + 0.8 * x
    c = spearman(x, y, permutations=20_000)
    rx, ry = x.argsort().argsort(), y.argsort().argsort()
    assert c.rho == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    n, sum_d2 = 10, ((rx - ry) ** 2).sum()
    assert c.rho == pytest.approx(1 - 6 * sum_d2 / (n * (n * n - 1)))
    # exact p for 7 points: every order enumerated here, independently of the module
    x7, y7 = x[:7], y[:7]
    r7x, r7y = x7.argsort().argsort(), y7.argsort().argsort()
    rho7 = np.corrcoef(r7x, r7y)[0, 1]
    orders = np.array(list(itertools.permutations(r7y)))
    exact = np.mean([abs(np.corrcoef(r7x, o)[0, 1]) >= abs(rho7) - 1e-12 for o in orders])
    assert spearman(x7, y7).p_value == pytest.approx(exact)
    assert 0 < c.p_value < 0.05  # a strong positive relation among 10 points


def test_spearman_of_a_constant_series_is_undefined():
    c = spearman([1, 2, 3], [5, 5, 5])
    assert np.isnan(c.rho) and np.isnan(c.p_value)


# ---- the study end to end -------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One --quick study on a 4-layer synthetic collection, run twice (the second resumes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    model_dir = write_model_dir(root / "model", tiny_config(layers=4))
    data_dir = write_collection(root / "data", model_dir, LAYERS, 2000)
    out, publish = root / "out", root / "findings"
    argv = ["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(out), "--quick"]
    main([*argv, "--publish", str(publish)])
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("pieces/*/*.pt")}
    first = json.loads((out / "study.json").read_text())
    main(argv)
    torch.set_num_threads(threads)
    return {"model": model_dir, "data": data_dir, "out": out, "publish": publish, "first": first,
            "checkpoints": checkpoints}  # fmt: skip


def test_quick_study_answers_every_question(study):
    out = study["out"]
    result = json.loads((out / "study.json").read_text())
    sweep = QUICK.sweep_layers(LAYERS)
    assert result["layers"] == LAYERS and result["sweep_layers"] == sweep == [0, 2, 3]
    by_target = result["sparsity"]["by_target"]
    assert set(by_target) == {str(s) for s in QUICK.sparsities}
    for s, entry in by_target.items():
        assert list(entry["layers"]) == [str(layer) for layer in sweep]
        assert entry["mean"]["true_sparsity"] == pytest.approx(float(s), abs=0.05)  # quantile of training rows
    h, f = 32, 64
    for rank, entry in result["rank"]["by_rank"].items():
        assert entry["weight_ratio"] == pytest.approx(int(rank) * (h + f) / (3 * h * f))
    assert [e["heads_kept"] for e in result["att"].values()] == [2]  # 50% of 4 heads
    assert list(result["base"]["layers"]) == [str(layer) for layer in LAYERS]  # the base predictor: every layer
    assert list(result["lookahead"]["lookahead"]["layers"]) == [str(layer) for layer in sweep]
    correlations = result["drift"]["correlations"]
    assert {c["recall"] for c in correlations} >= {"standard recall@true", "lookahead recall@true"}
    next_layer = next(c for c in correlations if c["drift"] == "1 - cos(l, l+1)")
    assert next_layer["layers"] == [0, 1, 2] and -1 <= next_layer["rho"] <= 1 and 0 < next_layer["p_value"] <= 1
    assert set(result["piece_seconds"]) == {*pieces(QUICK, LAYERS), "drift"}
    for name in PNGS:
        size = (out / f"{name}.png").stat().st_size
        assert 5_000 < size < 150_000
        assert (study["publish"] / f"{name}.png").is_file()
    assert {p.name for p in study["publish"].iterdir()} == {"study.json", "study.md", *(f"{n}.png" for n in PNGS)}
    assert "| **mean** |" in (out / "study.md").read_text()


def test_rerun_resumes_without_training_again(study):
    assert study["checkpoints"] == {p: p.stat().st_mtime_ns for p in study["out"].glob("pieces/*/*.pt")}
    second = json.loads((study["out"] / "study.json").read_text())
    assert second["rank"] == study["first"]["rank"] and second["drift"] == study["first"]["drift"]


def test_study_means_are_the_pieces_test_metrics(study):
    """Each reported recall is a saved predictor's on its test rows, recomputed in numpy from
    the raw files (standard and lookahead inputs), and each mean is over the sweep layers."""
    out, result = study["out"], json.loads((study["out"] / "study.json").read_text())
    lookahead = result["lookahead"]["lookahead"]
    for name, reported in [("mlp_r16_s50", result["base"]), ("mlp_r16_s50_lookahead", lookahead)]:
        metrics = json.loads((out / "pieces" / name / "metrics.json").read_text())["layers"]
        for layer in ("0", "3"):
            path = out / "pieces" / name / metrics[layer]["checkpoint"]
            want = mlp_test_metrics(study["data"], study["model"], path, metrics[layer]["split"])
            assert reported["layers"][layer]["recall"] == pytest.approx(want["recall"], abs=1e-4)
            assert reported["layers"][layer]["true_sparsity"] == pytest.approx(want["true_sparsity"], abs=1e-9)
    rank16 = result["rank"]["by_rank"]["16"]
    values = [rank16["layers"][str(layer)]["recall_at_true_sparsity"] for layer in result["sweep_layers"]]
    assert rank16["mean"]["recall_at_true_sparsity"] == pytest.approx(np.mean(values))


def test_lookahead_checkpoint_reads_the_layer_input(study):
    checkpoint = torch.load(Path(study["out"]) / "pieces/mlp_r16_s50_lookahead/mlp_layer_0.pt", weights_only=True)
    assert checkpoint["input"]["stem"] == "att_x" and checkpoint["input"]["norm"] == "input_layernorm.weight"
