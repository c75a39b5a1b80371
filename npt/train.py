"""Equivalence pre-training: teach the NPT layers to reproduce the original layers' outputs.

    python -m npt.train --model-name SHARD_DIR --out DIR --data train.jsonl \\
        [--val-data validation.jsonl] [--convert-layers last2] [--np-rank 16] [--max-steps N] [--resume]

The defaults are the best configuration the NPT study (``python -m npt.study``, FINDINGS.md)
measured on SmolLM2 for the last two layers, where the seeds' 5% is within reach: rank 16,
layer-wise, lr 1e-3, 60 steps: ratio 1.056 (the study's other candidate, end to end with
gate_up at rank 64, gives 1.059 run by this trainer), about 7 minutes on 2 shared CPU
cores. More layers cost more.

Only the NP parameters train (the base model is frozen and never copied). Layer-wise mode
feeds every NPT layer the original model's input to that layer and fits its output; all
converted layers train in the same step, each on its own input. End-to-end mode fits the
NPT model's final normed hidden states to the original's. ``<out>/npt.pt`` is saved atomically
every ``--save-every`` steps, at the end, and when Ctrl-C stops the run after its current
step; ``--resume`` continues from it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.atomic import atomic_write, write_json_atomic
from engine.config import ConfigError, ModelConfig
from engine.prompts import PromptError
from engine.shards import ShardError
from engine.tokenizer import load_tokenizer
from modules.llama_npt import NP_TARGETS, NPTConfig, freeze_all_but_np, parse_convert_layers
from modules.npt_checkpoint import CHECKPOINT_NAME, CheckpointError, NPTCheckpoint
from npt.cache import ResidualCache
from npt.data import batch_indices, load_windows
from npt.evaluate import EVAL_NAME, evaluate
from npt.losses import fidelity, regularizer
from npt.model import Residuals, ShardModel

LOG_NAME = "train_log.jsonl"


@dataclass
class StepLoss:
    total: torch.Tensor
    fidelity: torch.Tensor
    regularizer: torch.Tensor


def layerwise_loss(
    model: ShardModel, ids: torch.Tensor, lambda_reg: float, cached: Residuals | None = None
) -> StepLoss:
    """Each NPT layer on the original model's input to it, against the original output;
    fidelity and regularizer are averaged over layers, so the scale does not grow with them.
    Each layer's term depends on its own NP parameters only: the layers train independently."""
    with torch.no_grad():
        io = model.original_layer_io(ids, cached)
    ctx = model.context(ids)
    fid, reg = [], []
    for i, (x, target) in io.items():
        out, v_a, v_b = model.blocks[i].forward_with_np(x, ctx)
        fid.append(fidelity(out, target))
        reg.append(regularizer(v_a, v_b))
    f, r = torch.stack(fid).mean(), torch.stack(reg).mean()
    return StepLoss(f + lambda_reg * r, f, r)


def end_to_end_loss(
    model: ShardModel, ids: torch.Tensor, lambda_reg: float, cached: Residuals | None = None
) -> StepLoss:
    """The NPT model's final normed hidden states (what the LM head reads) against the
    original's. After the norm, the few huge residual channels no longer swamp the error
    in the channels that decide the logits."""
    with torch.no_grad():
        target = model.head.norm(model.hidden_states(ids, plastic=False, cached=cached)[0])
    hidden, vectors = model.hidden_states(ids, plastic=True, cached=cached)
    f = fidelity(model.head.norm(hidden), target)
    r = torch.stack([regularizer(v_a, v_b) for v_a, v_b in vectors.values()]).mean()
    return StepLoss(f + lambda_reg * r, f, r)


LOSSES = {"layerwise": layerwise_loss, "end-to-end": end_to_end_loss}


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m npt.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="converted shard directory")
    p.add_argument("--out", required=True, type=Path, help="directory for npt.pt, train_log.jsonl, eval.json")
    p.add_argument("--data", required=True, type=Path, help='training text: JSON lines with "prompt"')
    p.add_argument("--val-data", type=Path, help="held-out text (default: the last 10%% of --data's windows)")
    p.add_argument("--convert-layers", default="last2", help="upper_half | lower_half | all | lastK | a:b | 1,5,7")
    p.add_argument("--np-rank", type=int, default=16)
    p.add_argument("--np-init-scale", type=float, default=0.01)
    p.add_argument(
        "--np-target", choices=NP_TARGETS, default="gate", help="the MLP input projection(s) the update modulates"
    )
    p.add_argument("--mode", choices=tuple(LOSSES), default="layerwise")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lambda-reg", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-states",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the original model's hidden states entering the first converted layer (and the last "
        "layer's output) per training window, so the frozen layers run once per window, not once per step "
        "(memory: windows x seq-len x hidden x 4 bytes, twice)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from <out>/npt.pt")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (if installed)")
    return p.parse_args(argv)


def start_checkpoint(args: argparse.Namespace, num_layers: int) -> NPTCheckpoint:
    """The checkpoint to resume, or a fresh one; refuses to overwrite or to mix configs."""
    layers = parse_convert_layers(args.convert_layers, num_layers)
    wanted = NPTConfig(args.np_rank, args.np_init_scale, layers, args.np_target)
    path = args.out / CHECKPOINT_NAME
    if not path.exists():
        if args.resume:
            print(f"{path} does not exist yet: starting from step 0")
        return NPTCheckpoint(wanted, {})
    if not args.resume:
        raise SystemExit(f"{path} exists: pass --resume to continue it, or choose another --out")
    ckpt = NPTCheckpoint.load(path)
    if ckpt.config != wanted:
        raise SystemExit(f"{path} was trained with {ckpt.config}, the arguments ask for {wanted}")
    return ckpt


def open_wandb(args: argparse.Namespace):
    if not args.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("--wandb given but wandb is not installed (pip install wandb): logging to train_log.jsonl only")
        return None
    return wandb.init(project="npt-equivalence", config={k: str(v) for k, v in vars(args).items()})


class EquivalenceTrainer:
    """The model, optimizer and step count of one run; ``step`` is one optimizer step.
    ``cache``: the original residual stream of the training windows (None: recompute it)."""

    def __init__(self, args: argparse.Namespace, ckpt: NPTCheckpoint, cache: ResidualCache | None = None):
        self.args, self.config, self.steps, self.cache = args, ckpt.config, ckpt.step, cache
        self.model = ShardModel.load(args.model_name, ckpt).to(args.device)
        self.params = freeze_all_but_np(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.loss_fn = LOSSES[args.mode]

    def step(self, windows: torch.Tensor) -> dict[str, float]:
        """Train on the batch of the current step; returns its log row."""
        args, started = self.args, time.perf_counter()
        indices = batch_indices(len(windows), self.steps, args.batch_size, args.seed)
        ids = windows[indices].to(args.device)
        cached = None if self.cache is None else self.cache.get(self.model, indices, args.batch_size)
        lr = warmup_lr(self.steps, args.lr, args.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(self.model, ids, args.lambda_reg, cached)
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return {
            "step": self.steps,
            "loss": loss.total.item(),
            "fidelity": loss.fidelity.item(),
            "regularizer": loss.regularizer.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }

    def save(self) -> None:
        meta = {"model_name": str(self.args.model_name), "args": {k: str(v) for k, v in vars(self.args).items()}}
        NPTCheckpoint.from_model(
            self.config, self.model.npt_blocks, step=self.steps, optimizer=self.optimizer.state_dict(), meta=meta
        ).save(self.args.out / CHECKPOINT_NAME)


def prepare(args: argparse.Namespace) -> tuple[EquivalenceTrainer, torch.Tensor, torch.Tensor]:
    """The trainer (fresh or resumed) and the training and held-out windows."""
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model_name)
    windows = load_windows(args.data, tokenizer, args.seq_len)
    if args.val_data:
        val = load_windows(args.val_data, tokenizer, args.seq_len)
    else:
        held = max(1, len(windows) // 10)
        if held >= len(windows):
            raise SystemExit(f"{args.data} holds one window of --seq-len {args.seq_len}: pass --val-data")
        windows, val = windows[:-held], windows[-held:]
    num_layers = ModelConfig.from_model_dir(args.model_name).num_layers
    ckpt = start_checkpoint(args, num_layers)
    cache = ResidualCache(windows, (ckpt.config.layers[0], num_layers)) if args.cache_states else None
    return EquivalenceTrainer(args, ckpt, cache), windows, val[: args.eval_windows].to(args.device)


class StopRequest:
    """Ctrl-C asks the run to stop after its current step, so the checkpoint saved then holds
    whole optimizer steps; a second Ctrl-C stops at once (the last checkpoint stays)."""

    def __init__(self):
        self.asked = False

    def __enter__(self) -> StopRequest:
        self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        tqdm.write("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def trim_log(path: Path, steps: int) -> None:
    """Keep the log rows of the steps the checkpoint holds: a run killed between
    checkpoints logged steps (and maybe half a line) that the resumed run does again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= steps:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_write(path) as f:
        f.writelines(kept)


def train_steps(trainer: EquivalenceTrainer, windows: torch.Tensor, max_steps: int, log, on_row=None) -> None:
    """Step to ``max_steps`` (or until Ctrl-C asks to stop), one JSON log row a step, a
    checkpoint every ``--save-every`` steps and at the end; ``on_row`` sees each row."""
    bar = tqdm(total=max_steps, initial=trainer.steps, desc="npt equivalence", unit="step", leave=False)
    with StopRequest() as stop:
        while trainer.steps < max_steps and not stop.asked:
            row = trainer.step(windows)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if on_row is not None:
                on_row(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", fid=f"{row['fidelity']:.4g}")
            if trainer.steps % trainer.args.save_every == 0:
                trainer.save()
        bar.close()
        trainer.save()
        if stop.asked:
            raise KeyboardInterrupt


def train(args: argparse.Namespace) -> dict | None:
    """Train to ``--max-steps``, checkpoint, evaluate; returns the evaluation (None when
    Ctrl-C stopped the run early)."""
    trainer, windows, val = prepare(args)
    trim_log(args.out / LOG_NAME, trainer.steps)
    run = open_wandb(args)
    on_row = None if run is None else (lambda row: run.log(row, step=row["step"]))
    try:
        with open(args.out / LOG_NAME, "a") as log:
            train_steps(trainer, windows, args.max_steps, log, on_row)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.steps}: {args.out / CHECKPOINT_NAME} saved; --resume continues")
        return None
    result = {"step": trainer.steps, **evaluate(trainer.model, val, args.batch_size)}
    write_json_atomic(args.out / EVAL_NAME, result)
    if run is not None:
        run.summary.update({k: v for k, v in result.items() if isinstance(v, int | float)})
        run.finish()
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        result = train(parse_args(argv))
    except (PromptError, ShardError, ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result is None:
        return 130
    print(json.dumps({k: result[k] for k in ("step", "ppl_base", "ppl_npt", "ppl_ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
