"""Faults in what the engine reads and writes: damaged or foreign shard files fail before any
generation, files from elsewhere never run code, and a full disk while converting leaves
nothing behind."""

from __future__ import annotations

import ast
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import infer_args, write_prompts

from converters.convert_llama_checkpoint import main as convert_main
from engine.atomic import atomic_write, write_json_atomic
from engine.config import ModelConfig
from engine.shards import ShardError, expected_shapes, load_shard, save_shard
from modules.npt_checkpoint import FORMAT, CheckpointError, NPTCheckpoint

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "converters" / "convert_llama_checkpoint.py"
SOURCE_DIRS = ("engine", "modules", "pipeline", "launch", "converters", "sparse_predictor", "npt", "benchmarks")
SHARD = "pytorch_1.pt"


@pytest.fixture
def model_dir(tiny_shard_dir, tmp_path) -> Path:
    """A copy of the converted tiny model, free to damage."""
    return Path(shutil.copytree(tiny_shard_dir, tmp_path / "model"))


def run_infer_failing(capsys, model_dir: Path, tmp_path: Path, extra=()) -> str:
    """launch/infer.py must fail before writing results; returns its stderr."""
    from launch.infer import main

    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    assert main(infer_args(model_dir, prompts, out, ["--max-new-tokens", "2", *extra])) != 0
    assert not out.exists()
    return capsys.readouterr().err


def rewrite_shard(path: Path, change) -> None:
    tensors = torch.load(path, weights_only=True)
    change(tensors)
    torch.save(tensors, path)


def other_model_shard(model_dir: Path, **dims) -> dict[str, torch.Tensor]:
    """Layer 1 of another model: random weights, the tiny model's dimensions changed by ``dims``."""
    config = ModelConfig.from_model_dir(model_dir).replace(**dims)
    return {name: torch.randn(shape) for name, shape in expected_shapes(config, 1).items()}


def retype(key: str, dtype: torch.dtype):
    return lambda d: rewrite_shard(d / SHARD, lambda t: t.update({key: t[key].to(dtype)}))


# damage -> (what it does to the shard dir, what the error must say beyond the file, extra args)
DAMAGE = {
    "missing": (lambda d: (d / SHARD).unlink(), ["missing"], ()),
    "truncated": (lambda d: (d / SHARD).write_bytes((d / SHARD).read_bytes()[:1000]), ["truncated"], ()),
    "wrong-shape": (
        lambda d: rewrite_shard(d / SHARD, lambda t: t.update({"up_proj.weight": t["up_proj.weight"][:-1]})),
        ["'up_proj.weight' has shape (191, 64), expected (192, 64)"],
        (),
    ),
    "missing-tensor": (
        lambda d: rewrite_shard(d / SHARD, lambda t: t.pop("down_proj.weight")),
        ["'down_proj.weight'"],
        (),
    ),
    "wrong-dtype": (
        retype("gate_proj.weight", torch.float16),
        ["'gate_proj.weight' has dtype float16, expected float32"],
        (),
    ),
    "integer-dtype": (
        retype("gate_proj.weight", torch.int32),
        ["'gate_proj.weight' has dtype int32", "floating-point"],
        (),
    ),
    "extra-tensor": (
        lambda d: rewrite_shard(d / SHARD, lambda t: t.update({"self_attn.q_proj.bias": torch.zeros(64)})),
        ["unexpected tensor 'self_attn.q_proj.bias'"],
        (),
    ),
    "other-model-dims": (
        lambda d: save_shard(d, 1, other_model_shard(d, intermediate_size=128)),
        ["'gate_proj.weight' has shape (128, 64)"],
        (),
    ),
    "other-model-same-dims": (
        lambda d: save_shard(d, 1, other_model_shard(d)),
        ["sha256 differs from the manifest"],
        ("--verify-shards",),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_shard_fails_before_generation(model_dir, tmp_path, capsys, damage):
    """Each damage is an error naming the file (and tensor), never a run with wrong weights."""
    change, words, extra = DAMAGE[damage]
    change(model_dir)
    err = run_infer_failing(capsys, model_dir, tmp_path, extra)
    assert f"{model_dir / SHARD}" in err
    for word in words:
        assert word in err


def test_manifest_dtype_list_accepts_mixed_shards(model_dir):
    """A mixed checkpoint's manifest lists several dtypes; a shard may hold any of them."""
    config = ModelConfig.from_model_dir(model_dir)
    rewrite_shard(model_dir / SHARD, lambda t: t.update({"input_layernorm.weight": t["input_layernorm.weight"].half()}))
    with pytest.raises(ShardError, match="'input_layernorm.weight' has dtype float16, expected float32"):
        load_shard(model_dir, 1, config)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    write_json_atomic(model_dir / "manifest.json", {**manifest, "dtype": "float16,float32"})
    assert load_shard(model_dir, 1, config)["input_layernorm.weight"].dtype == torch.float16
    write_json_atomic(model_dir / "manifest.json", {**manifest, "dtype": "float33"})
    with pytest.raises(ShardError, match="manifest.json: unknown dtype 'float33'"):
        load_shard(model_dir, 1, config)


# ---- untrusted files -----------------------------------------------------------------


def unsafe_calls(path: Path) -> list[str]:
    """``file:line`` of each load that could unpickle code: torch.load without
    weights_only=True, pickle.load(s), np.load with allow_pickle."""

    def keyword(call: ast.Call, name: str):
        return next((k.value for k in call.keywords if k.arg == name), None)

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        call = f"{owner}.{node.func.attr}"
        weights_only = keyword(node, "weights_only")
        allow_pickle = keyword(node, "allow_pickle")
        if (
            (call == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True))
            or call in ("pickle.load", "pickle.loads")
            or (call in ("np.load", "numpy.load") and allow_pickle is not None)
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {call}")
    return found


def test_every_load_is_weights_only():
    files = [path for d in SOURCE_DIRS for path in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    problems = [problem for path in files for problem in unsafe_calls(path)]
    assert not problems, "loads that can run code from the file:\n" + "\n".join(problems)


class PlantsMarker:
    """Unpickling this creates the marker file: stands in for any code an attacker runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def save_malicious(path: Path, payload: dict, marker: Path) -> None:
    """Write ``payload`` and prove it is live: a plain (unsafe) load plants the marker."""
    torch.save(payload, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_malicious_shard_is_refused(model_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    save_malicious(model_dir / SHARD, {"gate_proj.weight": PlantsMarker(marker)}, marker)
    err = run_infer_failing(capsys, model_dir, tmp_path)
    assert f"{model_dir / SHARD}: refused to load" in err
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["meta", "hf-bin"])
def test_malicious_checkpoint_is_refused_by_the_converter(tiny_hf_dir, tmp_path, capsys, layout):
    marker, src, out = tmp_path / "MARKER", tmp_path / "src", tmp_path / "out"
    src.mkdir()
    if layout == "meta":
        (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 8, "vocab_size": 512}))
        weights = src / "consolidated.00.pth"
    else:
        shutil.copy(tiny_hf_dir / "config.json", src)
        weights = src / "pytorch_model.bin"
    save_malicious(weights, {"tok_embeddings.weight": PlantsMarker(marker)}, marker)
    assert convert_main(["--model-name", str(src), "--save-path", str(out)]) == 1
    assert f"{weights}: refused to load" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_malicious_npt_checkpoint_is_refused(tmp_path):
    marker, path = tmp_path / "MARKER", tmp_path / "npt.pt"
    save_malicious(path, {"format": FORMAT, "npt_config": PlantsMarker(marker)}, marker)
    with pytest.raises(CheckpointError, match=f"{path}: refused to load"):
        NPTCheckpoint.load(path)
    assert not marker.exists()


# ---- full disk -------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 200 KB file system: smaller than the tiny model (one layer shard is about 190 KB)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("full", ["file-size-limit", "tmpfs"])
def test_full_disk_while_converting(tiny_hf_dir, tmp_path, request, full):
    """A clear one-line error naming the shard being written; no save path, no temp dir."""
    limit = 100_000  # bytes: less than any shard of the tiny model

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    parent = request.getfixturevalue("tiny_tmpfs") if full == "tmpfs" else tmp_path / "disk"
    parent.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(CONVERTER), "--model-name", str(tiny_hf_dir), "--save-path", str(parent / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size if full == "file-size-limit" else None,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {parent}/.out.converting-") and ".pt: cannot write (disk full?): [Errno" in last
    assert list(parent.iterdir()) == []


def test_json_write_on_full_disk_leaves_nothing(tiny_tmpfs):
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(tiny_tmpfs / "big.json", {"rows": [0.5] * 100_000})
    assert list(tiny_tmpfs.iterdir()) == []


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write("half a fi")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [path] and path.read_text() == "old\n"
