"""Sparse-predictor data, training and CLI on tiny synthetic collect directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from predictor_reference import mlp_test_metrics, rows_of_blocks

from sparse_predictor import report
from sparse_predictor.data import CollectError, Collection, split_rows
from sparse_predictor.drift import embedding_drift
from sparse_predictor.labels import abs_quantile
from sparse_predictor.predictor import Task, low_rank_predictor
from sparse_predictor.synthetic import tiny_config, write_collection, write_model_dir
from sparse_predictor.train import main
from sparse_predictor.trainer import LayerData, Settings, train_layer

ROWS, CAPACITY = 3000, 3600
FAST = ["--D", "16", "--epochs", "3", "--lr", "1e-2", "--batch-size", "256", "--drift-rows", "1000"]
LAYER_KEYS = {
    "recall",
    "precision",
    "true_sparsity",
    "classifier_sparsity",
    "recall_at_true_sparsity",
    "curve",
    "threshold",
    "threshold_method",
    "heads_kept",
    "val_at_best_epoch",
    "train_rows",
    "val_rows",
    "test_rows",
    "split",
    "rows_per_second",
    "epochs_run",
    "best_epoch",
    "checkpoint",
}


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("sp_model"), tiny_config(layers=4))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model_dir) -> Path:
    """Layers 0, 1, 3 recorded (2 is a gap); the unfilled tail is NaN, so reading it shows."""
    path = tmp_path_factory.mktemp("sp_data")
    return write_collection(path, model_dir, [0, 1, 3], ROWS, capacity=CAPACITY, tail_value=float("nan"))


def raw(data_dir: Path, stem: str, layer: int, width: int) -> np.ndarray:
    """The first ROWS rows of a collected file, read without the package."""
    return np.fromfile(data_dir / f"{stem}_{layer}.mmap", dtype=np.float16).reshape(CAPACITY, width)[:ROWS]


def layer_data(collection: Collection, model_dir: Path, task: Task, layer: int, split) -> LayerData:
    return LayerData.open(collection, task, model_dir, tiny_config(layers=4), layer, split)


# ---- data ---------------------------------------------------------------------------
def test_arrays_hold_only_the_rows_written(data_dir):
    collection = Collection.open(data_dir)
    assert collection.layers == [0, 1, 3]
    x = collection.array("mlp_x", 0)
    assert x.shape == (ROWS, 32)
    np.testing.assert_array_equal(x, raw(data_dir, "mlp_x", 0, 32))
    assert np.isfinite(x).all()


def test_reads_what_the_save_mode_collector_wrote(tmp_path, model_dir):
    from engine.collector import ActivationCollector
    from modules.llama import RealRows

    config = tiny_config(layers=4)
    widths = {"att_x": 32, "att_label": 4, "mlp_x": 32, "mlp_label": 64}
    collector = ActivationCollector(
        tmp_path / "c", [1, 2], [1, 2], config, model_dir, "prompts.jsonl", capacity=50
    ).open()
    real = torch.tensor([[True, True, False], [True, True, True]])
    recorded = {name: torch.randn(2, 3, width) for name, width in widths.items()}
    for layer in (1, 2):
        collector.record(layer, RealRows.of(real), **recorded)
    collector.close()
    collection = Collection.open(tmp_path / "c")
    assert collection.layers == [1, 2] and collection.rows == {1: 5, 2: 5}
    for name, values in recorded.items():
        got = collection.read(collection.array(name, 2), np.arange(5)).float()
        torch.testing.assert_close(got, values[real].half().float())


def test_split_is_disjoint_deterministic_and_blockwise():
    split = split_rows(10_000, 0.1, 0.2, seed=3)
    parts = (split.train, split.val, split.test)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert len(np.intersect1d(a, b)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10_000))
    assert 0.08 < len(split.val) / 10_000 < 0.12 and 0.18 < len(split.test) / 10_000 < 0.22
    again = split_rows(10_000, 0.1, 0.2, seed=3)
    for a, b in zip(parts, (again.train, again.val, again.test)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(split.test, split_rows(10_000, 0.1, 0.2, seed=4).test)
    np.testing.assert_array_equal(split_rows(10_000, 0.3, 0.2, seed=3).test, split.test)  # test rows stay put
    for rows in (split.val, split.test):
        assert (np.diff(rows) == 1).mean() > 0.9  # whole blocks of consecutive tokens
    np.testing.assert_array_equal(rows_of_blocks(split.definition, "test_blocks"), split.test)
    np.testing.assert_array_equal(rows_of_blocks(split.definition, "val_blocks"), split.val)
    assert json.loads(json.dumps(split.definition)) == split.definition


def test_small_split_keeps_every_part():
    split = split_rows(3, 0.5, 0.4, seed=0)
    assert len(split.train) == len(split.val) == len(split.test) == 1
    with pytest.raises(ValueError, match="sum below 1"):
        split_rows(100, 0.5, 0.5, seed=0)


def test_unrecorded_or_empty_layer_is_a_clear_error(tmp_path, model_dir):
    data = write_collection(tmp_path / "d", model_dir, [0, 1], {0: 50, 1: 0})
    collection = Collection.open(data)
    with pytest.raises(CollectError, match=rf"layer 1 has no rows in {data}"):
        collection.array("mlp_x", 1)
    with pytest.raises(CollectError, match=rf"layer 2 was not recorded in {data}"):
        collection.rows_of(2)
    with pytest.raises(CollectError, match="layer 1 has no rows"):
        main(["--data-dir", str(data), "--model-name", str(model_dir), "--out", str(tmp_path / "o"), "--layers", "1"])


def test_truncated_file_names_the_file(tmp_path, model_dir):
    data = write_collection(tmp_path / "d", model_dir, [0], 40)
    path = data / "mlp_label_0.mmap"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CollectError, match="mlp_label_0.mmap"):
        Collection.open(data).array("mlp_label", 0)


def test_non_finite_value_names_the_file_and_row(tmp_path, model_dir):
    data = write_collection(tmp_path / "d", model_dir, [0], 40)
    x = np.memmap(data / "mlp_x_0.mmap", dtype=np.float16, mode="r+", shape=(40, 32))
    x[25, 3] = np.inf
    x.flush()
    collection = Collection.open(data)
    with pytest.raises(CollectError, match=r"mlp_x_0.mmap: non-finite value in row 25"):
        collection.read(collection.array("mlp_x", 0), np.array([30, 25, 2]))


def test_bfloat16_collection_reads_the_same_values(tmp_path, model_dir):
    f32 = Collection.open(write_collection(tmp_path / "f32", model_dir, [0], 20, dtype="float32"))
    bf16 = Collection.open(write_collection(tmp_path / "bf16", model_dir, [0], 20, dtype="bfloat16"))
    want = f32.read(f32.array("mlp_label", 0), np.arange(20)).float()
    got = bf16.read(bf16.array("mlp_label", 0), np.arange(20)).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_predictor_input_is_the_layers_rms_norm(data_dir, model_dir):
    collection = Collection.open(data_dir)
    rows = np.arange(10)
    for task, stem, key in [
        (Task.mlp(0.0, lookahead=False), "mlp_x", "post_attention_layernorm.weight"),
        (Task.mlp(0.0, lookahead=True), "att_x", "input_layernorm.weight"),
    ]:
        data = layer_data(collection, model_dir, task, 1, split_rows(ROWS, 0.1, 0.1, seed=0))
        inputs, _ = next(data.batches(rows, 10, "cpu"))
        x = raw(data_dir, stem, 1, 32)[:10].astype(np.float64)
        weight = torch.load(model_dir / "pytorch_1.pt", weights_only=True)[key].double().numpy()
        want = weight * x / np.sqrt((x**2).mean(axis=1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(inputs.numpy(), want, rtol=1e-4, atol=1e-5)


# ---- labels -------------------------------------------------------------------------
def test_threshold_is_numpy_quantile_of_training_rows(data_dir):
    collection = Collection.open(data_dir)
    train = split_rows(ROWS, 0.1, 0.1, seed=0).train
    threshold, method = abs_quantile(collection, collection.array("mlp_label", 3), train, 0.7, seed=0)
    want = np.quantile(np.abs(raw(data_dir, "mlp_label", 3, 64)[train].astype(np.float32)), 0.7)
    assert method == "exact" and threshold == pytest.approx(float(want), rel=1e-6)


def test_threshold_from_a_sample_when_labels_are_too_many(data_dir):
    collection = Collection.open(data_dir)
    train = split_rows(ROWS, 0.1, 0.1, seed=0).train
    labels = collection.array("mlp_label", 3)
    threshold, method = abs_quantile(collection, labels, train, 0.7, seed=0, max_values=500 * 64)
    exact, _ = abs_quantile(collection, labels, train, 0.7, seed=0)
    assert method == f"sampled 500 of {len(train)} training rows"
    assert threshold == pytest.approx(exact, rel=0.1)


# ---- training -----------------------------------------------------------------------
def test_low_rank_labels_are_learned_to_high_recall(data_dir, model_dir):
    collection = Collection.open(data_dir)
    split = split_rows(ROWS, 0.1, 0.1, seed=0)
    threshold, _ = abs_quantile(collection, collection.array("mlp_label", 0), split.train, 0.5, seed=0)
    data = layer_data(collection, model_dir, Task.mlp(threshold, lookahead=False), 0, split)
    settings = Settings(epochs=6, lr=1e-2, batch_size=256)
    torch.manual_seed(0)  # the predictor's init: the same result whatever ran before
    result = train_layer(low_rank_predictor(32, 16, 64), data, settings, name="test")
    assert result.val_metrics["recall"] > 0.95
    assert result.val_metrics["recall_at_true_sparsity"] > 0.95
    assert result.rows_per_second > 0
    assert set(result.state_dict) == {"0.weight", "1.weight"}


def test_cli_end_to_end(tmp_path, data_dir, model_dir):
    out = tmp_path / "out"
    common = ["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(out), *FAST]
    main([*common, "--layers", "all"])
    report_path = main([*common, "--kind", "att", "--layers", "0,3", "--att-keep", "0.5"])

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"format", "layers", "config", "att", "drift"}
    assert set(metrics["layers"]) == {"0", "1", "3"} and set(metrics["att"]["layers"]) == {"0", "3"}
    for entry in [*metrics["layers"].values(), *metrics["att"]["layers"].values()]:
        assert set(entry) == LAYER_KEYS
        assert entry["train_rows"] + entry["val_rows"] + entry["test_rows"] == ROWS
        assert all(np.isfinite(entry[k]) for k in ("recall", "precision", "recall_at_true_sparsity"))
    mlp0 = metrics["layers"]["0"]
    assert mlp0["recall"] > 0.9 and mlp0["threshold_method"] == "exact" and mlp0["heads_kept"] is None
    assert metrics["att"]["layers"]["0"]["heads_kept"] == 2 and metrics["att"]["layers"]["0"]["threshold"] is None
    assert metrics["att"]["layers"]["0"]["true_sparsity"] == pytest.approx(0.5)
    assert metrics["config"]["kind"] == "mlp" and metrics["att"]["config"]["kind"] == "att"
    assert metrics["drift"]["gaps"] == [[1, 3]]

    checkpoint = torch.load(out / "mlp_layer_3.pt", weights_only=True)
    assert checkpoint["layer"] == 3 and checkpoint["threshold"] == metrics["layers"]["3"]["threshold"]
    assert checkpoint["state_dict"]["0.weight"].shape == (16, 32)
    assert checkpoint["state_dict"]["1.weight"].shape == (64, 16)
    assert torch.load(out / "att_layer_0.pt", weights_only=True)["state_dict"]["1.weight"].shape == (4, 16)

    text = report_path.read_text()
    images = [line[line.index("(") + 1 : -1] for line in text.splitlines() if line.startswith("![")]
    assert {"mlp_recall_per_layer.png", "att_recall_curves.png", "drift_per_layer.png"} <= set(images)
    assert all((out / name).stat().st_size > 1000 for name in images)
    (out / "report.md").unlink()
    assert report.main(["--out", str(out)]).read_text() == text


def test_reported_metrics_are_the_saved_predictor_on_held_out_test_rows(tmp_path, data_dir, model_dir):
    """metrics.json's recall and precision are the saved checkpoint's on the test rows alone,
    recomputed in numpy from the raw files, the split's definition and the layer's shard; the
    test rows are disjoint from the training and validation rows."""
    out, layer = tmp_path / "out", 3
    args = ["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(out), *FAST]
    main([*args, "--layers", str(layer), "--test-fraction", "0.15", "--seed", "5"])
    entry = json.loads((out / "metrics.json").read_text())["layers"][str(layer)]
    split = entry["split"]
    assert (split["num_rows"], split["seed"], split["val_fraction"], split["test_fraction"]) == (ROWS, 5, 0.1, 0.15)
    want = mlp_test_metrics(data_dir, model_dir, out / entry["checkpoint"], split)
    train, val, test = want["train_rows"], want["val_rows"], want["test_rows"]
    assert len(np.intersect1d(test, val)) == 0
    assert (len(train), len(val), len(test)) == (entry["train_rows"], entry["val_rows"], entry["test_rows"])
    assert 0.13 < len(test) / ROWS < 0.17
    threshold = torch.load(out / entry["checkpoint"], weights_only=True)["threshold"]
    assert threshold == pytest.approx(np.quantile(want["train_labels"].astype(np.float32), 0.5), rel=1e-6)
    assert entry["true_sparsity"] == pytest.approx(want["true_sparsity"], abs=1e-12)
    assert entry["recall"] == pytest.approx(want["recall"], abs=1e-4)
    assert entry["precision"] == pytest.approx(want["precision"], abs=1e-4)
    assert entry["val_at_best_epoch"]["true_sparsity"] != entry["true_sparsity"]


def test_resume_keeps_finished_layers_and_refuses_other_settings(tmp_path, data_dir, model_dir, monkeypatch):
    out = tmp_path / "out"
    args = ["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(out), *FAST]
    args[args.index("--drift-rows") + 1] = "0"
    main([*args, "--layers", "0"])
    first = (out / "mlp_layer_0.pt").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)  # the same run, named by a relative path
    main([*args[:5], "out", *args[6:], "--layers", "0,1", "--resume"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["layers"]) == {"0", "1"} and (out / "mlp_layer_0.pt").stat().st_mtime_ns == first
    assert "drift" not in metrics and "Not measured" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="other settings .*D"):
        main([*args, "--layers", "0", "--resume", "--D", "8"])


def test_tail_rows_never_reach_the_trainer(tmp_path, data_dir, model_dir):
    """The fixture's tail is NaN: any read past the manifest's rows would poison these."""
    main(["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(tmp_path), "--layers", "1", *FAST])
    entry = json.loads((tmp_path / "metrics.json").read_text())["layers"]["1"]
    train = split_rows(ROWS, 0.1, 0.1, seed=0).train
    want = np.quantile(np.abs(raw(data_dir, "mlp_label", 1, 64)[train].astype(np.float32)), 0.5)
    assert entry["threshold"] == pytest.approx(float(want), rel=1e-6)
    assert 0.9 < entry["recall"] <= 1.0


# ---- drift --------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_drift_matches_numpy_and_skips_gaps(data_dir):
    drift = embedding_drift(Collection.open(data_dir), max_rows=ROWS)
    x = {layer: raw(data_dir, "att_x", layer, 32) for layer in (0, 1, 3)}
    assert drift["rows"] == ROWS and drift["first_layer"] == 0 and drift["gaps"] == [[1, 3]]
    assert drift["layers"]["0"]["cos_next"] == pytest.approx(cosine(x[0], x[1]), abs=1e-5)
    assert drift["layers"]["1"]["cos_next"] is None and drift["layers"]["3"]["cos_next"] is None
    assert drift["layers"]["3"]["cos_first"] == pytest.approx(cosine(x[3], x[0]), abs=1e-5)
    assert drift["layers"]["1"]["cos_mlp"] == pytest.approx(cosine(x[1], raw(data_dir, "mlp_x", 1, 32)), abs=1e-5)
    assert drift["layers"]["0"]["cos_first"] == pytest.approx(1.0, abs=1e-5)
    assert embedding_drift(Collection.open(data_dir), max_rows=100)["rows"] == 100


# ---- launch script ------------------------------------------------------------------
def test_launch_script_trains_the_layers_the_manifest_lists(tmp_path, model_dir):
    data = write_collection(tmp_path / "d", model_dir, [0, 2, 3], {0: 300, 2: 0, 3: 300})
    script = Path(__file__).parents[1] / "launch" / "train_predictors.sh"
    env = {**os.environ, "PYTHON": sys.executable, "KINDS": "mlp att", "OMP_NUM_THREADS": "1"}
    args = [str(data), str(model_dir), str(tmp_path / "out"), *FAST]
    done = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipping recorded layers without rows: [2]" in done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["layers"]) == set(metrics["att"]["layers"]) == {"0", "3"}
