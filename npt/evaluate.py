"""How close an NPT model is to its base model, on held-out real text.

    python -m npt.evaluate --model-name SHARD_DIR --npt-checkpoint OUT/npt.pt --data VAL.jsonl

Writes ``eval.json`` (next to the checkpoint unless ``--out``): the perplexity of the base
and the NPT model (same weights, NPT layers run plastic or as the original layers), their
ratio, and per NPT layer the fidelity MSE on the original layer input and the Frobenius
norm of the per-token weight update ||v_b v_a^T|| = |v_b| |v_a|."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.atomic import write_json_atomic
from engine.tokenizer import load_tokenizer
from modules.npt_checkpoint import NPTCheckpoint
from npt.data import load_windows
from npt.losses import delta_norm
from npt.model import Residuals, ShardModel

EVAL_NAME = "eval.json"


def batches(windows: torch.Tensor, batch_size: int, cached: Residuals | None):
    """The windows in batches, each with its slice of ``cached`` (the original residual
    stream of all the windows) or None."""
    for start in range(0, len(windows), batch_size):
        part = slice(start, start + batch_size)
        yield windows[part], None if cached is None else {i: s[part] for i, s in cached.items()}


@torch.no_grad()
def perplexity(
    model: ShardModel, windows: torch.Tensor, batch_size: int, plastic: bool, cached: Residuals | None = None
) -> float:
    """exp(mean next-token NLL) over every position of every window."""
    nll, count = 0.0, 0
    for ids, part in batches(windows, batch_size, cached):
        hidden, _ = model.hidden_states(ids, plastic, part)
        logits = model.head(hidden[:, :-1]).float()
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def layer_fidelity(
    model: ShardModel, windows: torch.Tensor, batch_size: int, cached: Residuals | None = None
) -> dict[str, dict[str, float]]:
    """Per NPT layer, on the original input to it: the MSE to the original output, that MSE
    relative to the original layer's own change (1.0 = as bad as skipping the layer's
    update), and the mean and max per-token ||dW||_F."""
    sums: dict[int, dict[str, float]] = {}
    for ids, part in batches(windows, batch_size, cached):
        ctx = model.context(ids)
        for i, (x, target) in model.original_layer_io(ids, part).items():
            out, v_a, v_b = model.blocks[i].forward_with_np(x, ctx)
            norms = delta_norm(v_a, v_b)
            s = sums.setdefault(i, {"se": 0.0, "change": 0.0, "elements": 0, "dw": 0.0, "dw_max": 0.0, "tokens": 0})
            s["se"] += (out - target).float().pow(2).sum().item()
            s["change"] += (target - x).float().pow(2).sum().item()
            s["elements"] += target.numel()
            s["dw"] += norms.sum().item()
            s["dw_max"] = max(s["dw_max"], norms.max().item())
            s["tokens"] += norms.numel()
    return {
        str(i): {
            "fidelity_mse": s["se"] / s["elements"],
            "fidelity_relative": s["se"] / s["change"],
            "dw_fro_mean": s["dw"] / s["tokens"],
            "dw_fro_max": s["dw_max"],
        }
        for i, s in sums.items()
    }


def evaluate(model: ShardModel, windows: torch.Tensor, batch_size: int, cached: Residuals | None = None) -> dict:
    ppl_base = perplexity(model, windows, batch_size, plastic=False, cached=cached)
    ppl_npt = perplexity(model, windows, batch_size, plastic=True, cached=cached)
    return {
        "ppl_base": ppl_base,
        "ppl_npt": ppl_npt,
        "ppl_ratio": ppl_npt / ppl_base,
        "tokens": windows.numel(),
        "np_parameters": sum(p.numel() for b in model.npt_blocks.values() for p in b.np.parameters()),
        "layers": layer_fidelity(model, windows, batch_size, cached),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m npt.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="converted shard directory")
    p.add_argument("--npt-checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help='held-out text: JSON lines with "prompt"')
    p.add_argument("--out", type=Path, help="where to write the JSON (default: eval.json beside the checkpoint)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=16, help="evaluate on at most this many windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt = NPTCheckpoint.load(args.npt_checkpoint)
    model = ShardModel.load(args.model_name, ckpt).to(args.device)
    windows = load_windows(args.data, load_tokenizer(args.model_name), args.seq_len)[: args.max_windows]
    result = {"step": ckpt.step, **evaluate(model, windows.to(args.device), args.batch_size)}
    write_json_atomic(args.out or args.npt_checkpoint.parent / EVAL_NAME, result)
    print(json.dumps({k: result[k] for k in ("step", "ppl_base", "ppl_npt", "ppl_ratio")}))


if __name__ == "__main__":
    main()
