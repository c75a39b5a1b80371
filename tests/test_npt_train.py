"""Equivalence training and evaluation on the tiny model: the loss falls, a resumed run is
the uninterrupted run, and perplexity matches HF's own (with attention cut where an NPT
layer with a zero update must equal "the layer without its attention residual")."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modules.llama_npt import NPTConfig
from modules.npt_checkpoint import NPTCheckpoint
from npt.evaluate import main as evaluate_main
from npt.evaluate import perplexity
from npt.model import ShardModel
from npt.train import parse_args, train

SENTENCES = [
    "The river rose overnight and the town council closed the old bridge.",
    "Farmers in the valley expect a late harvest after a cold and wet spring.",
    "The museum reopened its east wing with a collection of maps and letters.",
    "A small team of engineers rebuilt the signal box by hand over the summer.",
    "Tickets for the concert sold out within an hour of going on sale.",
    "The committee will publish its report on the water supply next month.",
    "Students planted two hundred trees along the northern edge of the park.",
    "The ferry service was suspended because of strong winds on the coast.",
]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"{s} {SENTENCES[(i + 3) % 8]}"}) for i, s in enumerate(SENTENCES * 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(shard_dir, out, data, *extra: str) -> dict:
    common = ["--seq-len", "32", "--batch-size", "4", "--np-rank", "8", "--eval-windows", "4", "--device", "cpu"]
    args = ["--model-name", str(shard_dir), "--out", str(out), "--data", str(data), *common, *extra]
    return train(parse_args(args))


def log_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# A random tiny model's attention residual lies mostly beyond a rank-1 gate update (the
# SmolLM2 benchmark measures the real fit), so the run starts from a large random update
# (np_init_scale 300, about 1.0 on the gate) that training must bring down. End to end, the
# normed final states also carry the attention residual that no update can restore, so
# the loss can fall by less there.
@pytest.mark.parametrize(("mode", "steps", "fall_to"), [("layerwise", 20, 0.5), ("end-to-end", 30, 0.8)])
def test_loss_falls(tiny_shard_dir, tmp_path, prompts, mode, steps, fall_to):
    out = tmp_path / mode
    extra = ["--mode", mode, "--max-steps", str(steps), "--lr", "1e-2", "--np-init-scale", "300"]
    result = run(tiny_shard_dir, out, prompts, *extra)
    fid = [r["fidelity"] for r in log_rows(out)]
    assert len(fid) == steps
    assert sum(fid[-3:]) < fall_to * sum(fid[:3]), fid
    assert result["ppl_ratio"] == pytest.approx(result["ppl_npt"] / result["ppl_base"])
    assert set(result["layers"]) == {"2", "3"}  # upper half of 4 layers
    assert json.loads((out / "eval.json").read_text())["step"] == steps


def test_resume_continues_like_an_uninterrupted_run(tiny_shard_dir, tmp_path, prompts):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    run(tiny_shard_dir, resumed, prompts, "--max-steps", "3", "--lr", "1e-2")
    with pytest.raises(SystemExit, match="--resume"):
        run(tiny_shard_dir, resumed, prompts, "--max-steps", "6")
    with pytest.raises(SystemExit, match="trained with"):
        run(tiny_shard_dir, resumed, prompts, "--max-steps", "6", "--resume", "--convert-layers", "all")
    run(tiny_shard_dir, resumed, prompts, "--max-steps", "6", "--lr", "1e-2", "--resume")
    run(tiny_shard_dir, straight, prompts, "--max-steps", "6", "--lr", "1e-2")

    assert [r["step"] for r in log_rows(resumed)] == [1, 2, 3, 4, 5, 6]
    a, b = NPTCheckpoint.load(resumed / "npt.pt"), NPTCheckpoint.load(straight / "npt.pt")
    assert a.step == b.step == 6
    for layer in (2, 3):
        for name, tensor in b.np_state[layer].items():
            torch.testing.assert_close(a.np_state[layer][name], tensor, rtol=1e-6, atol=1e-7)


def hf_perplexity(tiny_hf_dir, ids: torch.Tensor, cut_attention: tuple[int, ...] = ()) -> float:
    """HF's own loss; ``cut_attention`` zeroes those layers' attention outputs by hooks."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    for i in cut_attention:
        model.model.layers[i].self_attn.register_forward_hook(lambda m, args, out: (torch.zeros_like(out[0]), *out[1:]))
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_perplexity_matches_hf(tiny_shard_dir, tiny_hf_dir):
    # np_init_scale 0: W_b_up = 0, so each NPT layer is exactly its layer without attention.
    model = ShardModel.load(tiny_shard_dir, NPTCheckpoint(NPTConfig(np_rank=4, np_init_scale=0.0, layers=(1, 3)), {}))
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(5))
    base = perplexity(model, ids, batch_size=2, plastic=False)
    cut = perplexity(model, ids, batch_size=2, plastic=True)
    assert base == pytest.approx(hf_perplexity(tiny_hf_dir, ids), rel=1e-4)
    assert cut == pytest.approx(hf_perplexity(tiny_hf_dir, ids, cut_attention=(1, 3)), rel=1e-4)
    assert abs(cut - base) > 10 * 1e-4 * base  # the cut is visible beyond the tolerance


def test_evaluate_command_writes_eval_json(tiny_shard_dir, tmp_path, prompts):
    out = tmp_path / "run"
    run(tiny_shard_dir, out, prompts, "--max-steps", "2", "--convert-layers", "1,3")
    target = tmp_path / "again.json"
    argv = ["--model-name", str(tiny_shard_dir), "--npt-checkpoint", str(out / "npt.pt"), "--data", str(prompts)]
    evaluate_main([*argv, "--seq-len", "32", "--out", str(target), "--device", "cpu"])
    result = json.loads(target.read_text())
    assert result["step"] == 2
    assert result["ppl_ratio"] == pytest.approx(result["ppl_npt"] / result["ppl_base"])
    assert set(result["layers"]) == {"1", "3"}
    for layer in result["layers"].values():
        assert layer["fidelity_mse"] > 0 and 0 < layer["dw_fro_mean"] <= layer["dw_fro_max"]
