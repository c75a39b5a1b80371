"""Faults in the trainers: an interruption keeps the finished work and never a half file,
bad data is an error naming it, and a resumed NPT run is one clean run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_scenarios import leftover_temporary_files
from pipeline_helpers import ROOT

import sparse_predictor.train as predictor_train
from sparse_predictor.synthetic import tiny_config, write_collection, write_model_dir

FAST = ["--D", "8", "--epochs", "1", "--batch-size", "256", "--drift-rows", "200"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[Path, Path]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("model"), tiny_config(layers=4))
    return model_dir, write_collection(tmp_path_factory.mktemp("collect"), model_dir, [0, 1, 2, 3], 800)


def test_interrupted_predictor_run_keeps_finished_layers(collection, tmp_path, monkeypatch, capsys):
    model_dir, data_dir = collection
    out = tmp_path / "predictors"
    real_train_one = predictor_train.train_one

    def interrupted_at_layer_2(args, collection, config, layer):
        if layer == 2:
            raise KeyboardInterrupt
        return real_train_one(args, collection, config, layer)

    monkeypatch.setattr(predictor_train, "train_one", interrupted_at_layer_2)
    args = ["--data-dir", str(data_dir), "--model-name", str(model_dir), "--out", str(out), "--layers", "all", *FAST]
    assert predictor_train.cli(args) == 130
    assert "interrupted: the finished layers' checkpoints and metrics.json are kept" in capsys.readouterr().err
    assert set(json.loads((out / "metrics.json").read_text())["layers"]) == {"0", "1"}
    assert sorted(p.name for p in out.glob("*.pt")) == ["mlp_layer_0.pt", "mlp_layer_1.pt"]
    assert torch.load(out / "mlp_layer_1.pt", weights_only=True)["layer"] == 1
    assert not leftover_temporary_files(out)


def test_predictor_data_shorter_than_its_manifest(collection, tmp_path, capsys):
    """A collect file cut short (copied while written, disk trouble): an error naming it."""
    model_dir, data_dir = collection
    damaged = Path(shutil.copytree(data_dir, tmp_path / "collect"))
    with open(damaged / "mlp_label_1.mmap", "r+b") as f:
        f.truncate(1000)
    args = ["--data-dir", str(damaged), "--model-name", str(model_dir), "--out", str(tmp_path / "o"), "--layers", "1"]
    assert predictor_train.cli([*args, *FAST]) == 1
    err = capsys.readouterr().err
    assert "mlp_label_1.mmap: 1000 bytes, but 800 rows" in err


# ---- NPT equivalence training -----------------------------------------------------------------


def npt_command(shard_dir: Path, out: Path, data: Path, steps: int, *extra: str) -> list[str]:
    common = ["--seq-len", "16", "--batch-size", "2", "--np-rank", "4", "--eval-windows", "2", "--device", "cpu"]
    return [
        *(sys.executable, "-m", "npt.train", "--model-name", str(shard_dir), "--out", str(out), "--data", str(data)),
        *("--max-steps", str(steps), *common, *extra),
    ]


@pytest.fixture
def npt_data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    text = "The quick brown fox jumps over the lazy dog while the river runs past the mill. "
    path.write_text("".join(json.dumps({"prompt": text * 2}) + "\n" for _ in range(12)))
    return path


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def start_npt(command: list[str], out: Path, at_least_steps: int) -> subprocess.Popen:
    """Start a training run and wait until it has logged ``at_least_steps`` steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= at_least_steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def test_npt_ctrl_c_saves_a_whole_step_and_resume_finishes(tiny_shard_dir, tmp_path, npt_data):
    out = tmp_path / "npt"
    proc = start_npt(npt_command(tiny_shard_dir, out, npt_data, 100_000, "--save-every", "1000"), out, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    saved = torch.load(out / "npt.pt", weights_only=True)["step"]
    assert f"interrupted at step {saved}" in stdout
    assert logged_steps(out) == list(range(1, saved + 1))

    resumed = subprocess.run(
        npt_command(tiny_shard_dir, out, npt_data, saved + 2, "--resume"), cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, saved + 3))
    assert json.loads((out / "eval.json").read_text())["step"] == saved + 2


def test_npt_killed_between_checkpoints_resumes_cleanly(tiny_shard_dir, tmp_path, npt_data):
    """SIGKILL after the step-2 checkpoint: the log's later steps are redone, not doubled."""
    out = tmp_path / "npt"
    proc = start_npt(npt_command(tiny_shard_dir, out, npt_data, 100_000, "--save-every", "2"), out, 3)
    proc.kill()
    proc.communicate()
    saved = torch.load(out / "npt.pt", weights_only=True)["step"]
    assert len(logged_steps(out)) >= saved
    resumed = subprocess.run(
        npt_command(tiny_shard_dir, out, npt_data, saved + 1, "--resume"), cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, saved + 2))


def test_npt_bad_data_is_one_line(tiny_shard_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    result = subprocess.run(
        npt_command(tiny_shard_dir, tmp_path / "o", bad, 2), cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "bad.jsonl:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr
