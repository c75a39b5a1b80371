"""Faults while running: a rank killed or hung mid-decode, Ctrl-C, a full disk while collecting.

Each must cost a clear message and a non-zero exit within bounded time, never a hang, a
half-written results file, or a manifest that claims rows which were not written."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from fault_scenarios import (
    PROMPTS,
    SETTINGS,
    leftover_temporary_files,
    node_of,
    rank_pid,
    start_nodes,
    start_ranks,
    start_torchrun,
    wait_until_decoding,
)
from pipeline_helpers import INFER, ROOT, infer_args, read_dataset, write_prompts

from engine.collect_manifest import recorded_rows

pytestmark = pytest.mark.slow
PROGRESS_ROWS = 60
TIMEOUT = 5  # --dist-timeout of the runs that must stop by themselves
NODE_TIMEOUT = 30  # the two "nodes" start slower: torchrun agents meeting at a rendezvous


@pytest.fixture(scope="module")
def reference(tiny_shard_dir, tmp_path_factory):
    """The same 2-stage collection run to completion: every published row must equal its row."""
    run = start_torchrun(tiny_shard_dir, tmp_path_factory.mktemp("reference"), 2)
    codes, _ = run.wait(300)
    assert codes == [0], run.stderr()[-3000:]
    return read_dataset(run.collect_dir)[1]


def assert_published_rows_are_valid(collect_dir, reference, at_least: int = PROGRESS_ROWS) -> dict:
    """The manifest claims only rows that were written, and they are the complete run's rows."""
    manifest, data = read_dataset(collect_dir)
    assert manifest["rows"]["0"] >= at_least
    for key, rows in data.items():
        np.testing.assert_array_equal(rows, reference[key][: len(rows)], err_msg=str(key))
    return manifest


def assert_nothing_half_written(run) -> None:
    assert not run.out.exists(), "a failed run must not leave a results file"
    assert not leftover_temporary_files(run.out.parent, run.collect_dir)


def test_killed_rank_under_torchrun(tiny_shard_dir, reference, tmp_path):
    """SIGKILL of rank 1 mid-decode: torchrun reports it and stops rank 0, which keeps its rows."""
    run = start_torchrun(tiny_shard_dir, tmp_path, 2, ["--dist-timeout", str(TIMEOUT)])
    try:
        wait_until_decoding(run, PROGRESS_ROWS)
        os.kill(rank_pid(run, 1), signal.SIGKILL)
        codes, _ = run.wait(TIMEOUT + 30)
    finally:
        run.kill_all()
    assert codes[0] not in (0, None)
    err = run.stderr()
    assert "Signal 9 (SIGKILL)" in err and "infer.py FAILED" in err, err[-3000:]
    assert_nothing_half_written(run)
    assert_published_rows_are_valid(run.collect_dir, reference)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_survivor_stops_by_itself(tiny_shard_dir, reference, tmp_path, fault):
    """Without a launcher to stop it (as on another node), rank 0 notices a dead peer at once
    and a hung one within --dist-timeout, says which, and exits non-zero."""
    run = start_ranks(tiny_shard_dir, tmp_path, 2, ["--dist-timeout", str(TIMEOUT)])
    try:
        wait_until_decoding(run, PROGRESS_ROWS)
        os.kill(run.procs[1].pid, fault)
        start = time.monotonic()
        code = run.procs[0].wait(timeout=TIMEOUT + 60)
        seconds = time.monotonic() - start
    finally:
        run.kill_all()
    err = run.logs[0].read_text()
    assert code == 1, err[-3000:]
    if fault == signal.SIGKILL:
        lost = r"error \(rank 0\): lost contact while (receiving from|sending to) rank 1: its connection closed"
        assert re.search(lost, err), err[-3000:]
    else:  # rank 0 waits on rank 1's messages (the ranks share no lock)
        hung = f"lost contact while receiving from rank 1: nothing arrived within --dist-timeout {TIMEOUT} s"
        hung = f"error (rank 0): {hung}"
        assert hung in err, err[-3000:]
        assert seconds >= TIMEOUT - 1
    assert_nothing_half_written(run)
    assert_published_rows_are_valid(run.collect_dir, reference)


def test_lost_node_stops_the_other_and_the_join_claims_only_written_rows(tiny_shard_dir, reference, tmp_path):
    """Two "nodes", a collect dir each: the node of rank 1 dies whole (agent and rank) mid-decode.
    Rank 0, on the other node, stops by itself, names rank 1, and keeps its rows; the
    joined dataset claims only rows that both nodes' parts published."""
    run = start_nodes(tiny_shard_dir, tmp_path, ["--dist-timeout", str(NODE_TIMEOUT)])
    try:
        wait_until_decoding(run, PROGRESS_ROWS)
        victim = rank_pid(run, 1)
        survivor = psutil.Process(rank_pid(run, 0))
        node = node_of(run, victim)
        run.procs[node].kill()
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        survivor.wait(timeout=NODE_TIMEOUT + 30)
        seconds = time.monotonic() - start
        run.procs[1 - node].wait(timeout=60)
    finally:
        run.kill_all()
    err = run.logs[1 - node].read_text()
    assert seconds < NODE_TIMEOUT, err[-3000:]
    lost = r"error \(rank 0\): lost contact while (receiving from|sending to) rank 1: its connection closed"
    assert re.search(lost, err), err[-3000:]
    assert not run.out.exists()
    from engine.collect_join import main as join

    assert join([str(run.collect_dir), *map(str, run.node_dirs)]) == 0
    manifest = assert_published_rows_are_valid(run.collect_dir, reference)
    assert min(manifest["rows"].values()) > 0


def test_ctrl_c_stops_every_rank_and_keeps_rows(tiny_shard_dir, reference, tmp_path):
    """SIGINT to torchrun: every rank unwinds within seconds and publishes what it wrote."""
    run = start_torchrun(tiny_shard_dir, tmp_path, 2)
    try:
        wait_until_decoding(run, PROGRESS_ROWS)
        workers = psutil.Process(run.procs[0].pid).children(recursive=True)
        run.procs[0].send_signal(signal.SIGINT)
        codes, seconds = run.wait(60)
    finally:
        run.kill_all()
    assert codes[0] not in (0, None)
    assert seconds < 20, "torchrun had to kill its workers"
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    err = run.stderr()
    assert "interrupted (rank 0) by SIGINT" in err and "keeps the rows its manifest lists" in err, err[-3000:]
    assert_nothing_half_written(run)
    assert_published_rows_are_valid(run.collect_dir, reference)


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB filesystem: it fills up a few hundred tokens into a collection."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def collect_in_process(model_dir, tmp_path, collect_dir, capsys, extra=()) -> tuple[int, str]:
    from launch.infer import main

    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    out = tmp_path / f"{collect_dir.name}.jsonl"
    code = main(infer_args(model_dir, prompts, out, [*SETTINGS, "--collect-dir", str(collect_dir), *extra]))
    assert out.exists() == (code == 0)
    return code, capsys.readouterr().err


def test_disk_full_while_collecting(tiny_shard_dir, tmp_path, tiny_tmpfs, capsys):
    """ENOSPC mid-run: an error naming the file; the manifest claims only written rows."""
    code, err = collect_in_process(tiny_shard_dir, tmp_path, tmp_path / "complete", capsys)
    assert code == 0, err
    _, reference = read_dataset(tmp_path / "complete")

    with pytest.warns(UserWarning, match="may write up to .* GB, .* GB free in"):
        code, err = collect_in_process(
            tiny_shard_dir, tmp_path, tiny_tmpfs / "collect", capsys, ["--collect-ignore-disk-space"]
        )
    assert code == 1
    assert "error (rank 0): " in err and ".mmap: writing rows" in err and "No space left on device" in err, err
    assert_published_rows_are_valid(tiny_tmpfs / "collect", reference, at_least=1)
    assert not leftover_temporary_files(tiny_tmpfs)


def test_file_size_limit_at_start_then_rerun(tiny_shard_dir, tmp_path):
    """A disk too small for the files fails before any row, naming the file; the empty
    dataset it leaves does not block the next run."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "Hello there"}])
    collect_dir, out = tmp_path / "collect", tmp_path / "out.jsonl"
    args = infer_args(tiny_shard_dir, prompts, out, ["--model-type", "llama-save", "--collect-dir", str(collect_dir)])
    limit = 100_000  # bytes; each file is sized for 400000 rows up front

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(INFER), *args]
    failed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=small_files)
    assert failed.returncode == 1
    assert "att_x_0.mmap: cannot size the file" in failed.stderr and "File too large" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not out.exists()
    assert set(recorded_rows(collect_dir).values()) <= {0}

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = set(read_dataset(collect_dir)[0]["rows"].values())
    assert len(rows) == 1 and rows.pop() > 0
