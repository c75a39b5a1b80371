"""Sparse inference speed: one MLP layer, then whole-model batch-1 decode, dense side by side.

    python -m benchmarks.bench_sparse [--threads 2] [--skip-1b]

1. One MLP layer at the Llama 3.2 1B shape (2048 x 8192), batch 1, 4 and 16: the dense
   MLP against the predictor mode (a rank-128 predictor, its cost included) and TEAL, at
   several sparsities. Selections are random-weight predictors and thresholds taken from
   the layer's own activations: speed depends on how many units are kept, not which.
2. Batch-1 decode tokens/s of the bundled SmolLM2 (and HF generate on it) and of a
   random-weight Llama 3.2 1B-shaped model: dense against each mode at 50% and 70%.

Times are medians of interleaved repeats in one process with the same threads."""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import smollm_model_dir
from engine.config import ModelConfig
from modules.llama import LlamaBlock, LlamaEmbeddings, LlamaLMHead, LlamaMLP
from modules.llama_sparse import LayerPredictor, PredictedMLP, SparseSettings, TealMLP
from modules.packed_linear import pack_linears
from sparse_predictor.evaluate_sparse import SparseModel, greedy_speed
from sparse_predictor.predictor import low_rank_predictor

PREDICTOR_RANK = 128
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                  num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)  # fmt: skip


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, run interleaved so drifts hit all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (and the kernels' compilation)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def thresholds_for(mlp: LlamaMLP, x: torch.Tensor, sparsity: float) -> tuple[float, float]:
    """TEAL's thresholds from the layer's own inputs and activations."""
    with torch.no_grad():
        act = mlp.activation(x)
    return x.abs().quantile(sparsity).item(), act.abs().flatten()[:1_000_000].quantile(sparsity).item()


def random_predictor(config: ModelConfig) -> nn.Module:
    return low_rank_predictor(config.hidden_size, PREDICTOR_RANK, config.intermediate_size).requires_grad_(False)


@torch.inference_mode()
def bench_layer(repeats: int) -> None:
    config = ModelConfig(**LLAMA32_1B)
    torch.manual_seed(0)
    mlp = LlamaMLP(config).requires_grad_(False)
    calibration = torch.randn(256, config.hidden_size)
    print(f"## One MLP layer {config.hidden_size} x {config.intermediate_size}, {torch.get_num_threads()} threads")
    packed = copy.deepcopy(mlp)
    pack_linears(packed)  # the engine's dense default on a CPU
    print("speed-ups: against dense row-major / against dense packed")
    print("| batch | sparsity | dense ms | dense packed ms | predictor ms | speed-up | teal ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (1, 4, 16):
        x = torch.randn(batch, config.hidden_size)
        for sparsity in (0.3, 0.5, 0.7, 0.9):
            modules = {
                "dense": mlp,
                "packed": packed,
                "predictor": PredictedMLP(mlp, sparsity, random_predictor(config), lookahead=False),
                "teal": TealMLP(mlp, sparsity, *thresholds_for(mlp, calibration, sparsity)),
            }
            ms = median_ms({name: _call(m, x) for name, m in modules.items()}, repeats)
            cells = [
                f"{ms[n]:.2f} | {ms['dense'] / ms[n]:.2f}x / {ms['packed'] / ms[n]:.2f}x" for n in ("predictor", "teal")
            ]
            print(f"| {batch} | {sparsity:.1f} | {ms['dense']:.2f} | {ms['packed']:.2f} | {' | '.join(cells)} |")


def _call(module: nn.Module, x: torch.Tensor):
    return (lambda: module(x)) if isinstance(module, LlamaMLP) else (lambda: module(x, x))


def settings_for(model, mode: str, sparsity: float, calibration: torch.Tensor) -> SparseSettings:
    """Random predictors or TEAL thresholds from each layer's own MLP inputs on ``calibration``."""
    config = model.stage.config
    if mode == "predictor":
        return SparseSettings(mode, sparsity, predictors={
            i: LayerPredictor(random_predictor(config), False) for i in range(config.num_layers)})  # fmt: skip
    inputs = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0][0]))
             for i, b in enumerate(model.full.blocks)]  # fmt: skip
    with torch.inference_mode():
        model.full.hidden_states(calibration[None])
    for h in hooks:
        h.remove()
    thresholds = {i: thresholds_for(model.full.blocks[i].mlp, x, sparsity) for i, x in inputs.items()}
    return SparseSettings(mode, sparsity, thresholds=thresholds)


def bench_model(name: str, model, prompts: list[torch.Tensor], new_tokens: int, extra: dict[str, float]) -> None:
    """Dense with row-major weights first; then each sparse model as the engine runs it on a
    CPU (attention and head packed, shared with the dense model; the MLP's selections read
    its row-major weights); then dense packed, the engine's CPU default."""
    dense = greedy_speed(model, prompts, new_tokens)[1]
    rows = []
    calibration = torch.cat(prompts)
    for mode in ("predictor", "teal", "oracle"):
        for sparsity in (0.5, 0.7):
            sparse = model.sparse(settings_for(model, mode, sparsity, calibration) if mode != "oracle"
                                  else SparseSettings(mode, sparsity))  # fmt: skip
            sparse.stage.pack_weights()
            tps = greedy_speed(sparse, prompts, new_tokens)[1]
            rows.append((mode, sparsity, sparse.measured_sparsity(), tps))
            del sparse
    model.stage.pack_weights()  # last: the sparse models slice its MLP weights
    packed = greedy_speed(model, prompts, new_tokens)[1]
    print(f"## {name}: batch-1 decode, {new_tokens} tokens x {len(prompts)} prompts, {torch.get_num_threads()} threads")
    print(f"dense engine: {packed:.2f} tokens/s packed (the CPU default), {dense:.2f} row-major")
    for label, tps in extra.items():
        print(f"{label}: {tps:.2f} tokens/s (engine dense packed = {packed / tps:.2f}x)")
    print("| mode | sparsity | measured | tokens/s | vs dense packed | vs dense row-major |\n|---|---|---|---|---|---|")
    for mode, sparsity, measured, tps in rows:
        print(f"| {mode} | {sparsity:.1f} | {measured:.3f} | {tps:.2f} | {tps / packed:.2f}x | {tps / dense:.2f}x |")


def hf_batch1_tokens_per_second(model_dir: Path, prompts: list[torch.Tensor], new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    from benchmarks.common import gguf_path

    path = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    seconds = tokens = 0
    for prompt in prompts:
        with torch.no_grad():
            ids = prompt[None]
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)  # prefill alone
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            spent = time.perf_counter() - start
            prefill_start = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            spent -= time.perf_counter() - prefill_start
        seconds, tokens = seconds + spent, tokens + new_tokens - 1
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-1b", action="store_true", help="skip the 1B-shaped model (5 GB of memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench_layer(args.repeats)

    from engine.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = smollm_model_dir(Path(tmp))
        tokenizer = load_tokenizer(model_dir)
        texts = ["The capital of France is", "Once upon a time, in a small village at the edge of a great forest,"]
        prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
        smol = SparseModel.load(model_dir, ModelConfig.from_model_dir(model_dir))
        hf = hf_batch1_tokens_per_second(model_dir, prompts, args.new_tokens)
        bench_model("SmolLM2-135M", smol, prompts, args.new_tokens, {"HF generate": hf})
    if not args.skip_1b:
        config = ModelConfig(**LLAMA32_1B)
        torch.manual_seed(0)
        blocks = [LlamaBlock(config, i).requires_grad_(False) for i in range(config.num_layers)]
        big = SparseModel(config, blocks, LlamaEmbeddings(config), LlamaLMHead(config))
        prompts = [torch.randint(0, config.vocab_size, (16,)) for _ in range(2)]
        bench_model("random Llama 3.2 1B shape", big, prompts, args.new_tokens // 2, {})


if __name__ == "__main__":
    main()
