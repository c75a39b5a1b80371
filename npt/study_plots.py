"""The NPT study's plots: the frontier (perplexity ratio against NP parameters) and the
per-layer limits of the attention residual that the update can reproduce."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.lines import Line2D  # noqa: E402

#: Ratios above this (diverged runs) are drawn at it, labelled with their value.
RATIO_CEILING = 300.0
MARKERS = {"last1": "o", "last2": "s", "last4": "^", "upper_half": "D"}
COLORS = {
    ("layerwise", "gate"): "tab:blue",
    ("end-to-end", "gate"): "tab:orange",
    ("layerwise", "gate_up"): "tab:green",
    ("end-to-end", "gate_up"): "tab:red",
}


def plot_frontier(result: dict, path: Path) -> None:
    """Perplexity ratio against NP parameters: colour = mode and W_in reading, marker =
    converted layers, label = rank; the frontier dashed, the seeds' goal dotted, and per
    layer set the ratio of dropping its attention outright (grey)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["points"]:
        color = COLORS.get((r["mode"], r["target"]), "gray")
        xy = (r["np_parameters"], min(r["ppl_ratio"], RATIO_CEILING))
        ax.scatter(*xy, color=color, marker=MARKERS.get(r["layer_set"], "x"))
        lr = "" if r["lr"] == result["settings"]["lr"] else f" lr {r['lr']:g}"
        off = "" if r["ppl_ratio"] <= RATIO_CEILING else f" (ratio {r['ppl_ratio']:.3g})"
        ax.annotate(f"r{r['rank']}{lr}{off}", xy, fontsize=6, xytext=(3, 2), textcoords="offset points")
    front = [r for r in result["points"] if r["run"] + ":" + r["layer_set"] in result["frontier"]]
    ax.plot([r["np_parameters"] for r in front], [r["ppl_ratio"] for r in front], "k--", lw=0.8)
    ax.axhline(result["ratio_goal"], color="green", lw=0.8, ls=":")
    for name, ratio in result["ratio_without_attention"].items():
        ax.axhline(ratio, color="gray", lw=0.5, ls="-.")
        ax.annotate(f"{name}, no update", (1, ratio), xycoords=("axes fraction", "data"), fontsize=6, ha="right")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=f"{m}, W_in = {t}") for (m, t), c in COLORS.items()]
    handles += [Line2D([], [], color="black", marker=m, ls="", mfc="none", label=s) for s, m in MARKERS.items()]
    handles += [Line2D([], [], color="k", ls="--", lw=0.8, label="frontier")]
    handles += [Line2D([], [], color="green", ls=":", lw=0.8, label=f"seeds' goal {result['ratio_goal']}")]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NP parameters")
    ax.set_ylabel("perplexity NPT / base")
    steps, base = result["settings"]["steps"], result["ppl_base"]
    ax.set_title(f"NPT equivalence after {steps} steps ({Path(result['model']).name}, base ppl {base:.1f})")
    ax.legend(handles=handles, fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_limits(result: dict, path: Path) -> None:
    """Left, per layer of the layer-wise run with the most layers: how much of the layer's
    change is the attention residual t, how much of t is odd in a (out of reach of an even
    update), how large a's common component is, how much of t the rank-r subspace holds and
    how much the trained update reproduces. Right, per layer-wise run: the last two, summed
    over its layers."""
    runs = result["limits"]
    widest = max(runs, key=lambda name: len(runs[name]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    layers = sorted(runs[widest], key=int)
    x = [int(i) for i in layers]
    for key, style, label in (
        ("attention_share", "k:", "|t|^2 / |layer change|^2"),
        ("odd_share", "k-", "odd share of t (no even update reaches it)"),
        ("mean_share", "c-", "|mean a|^2 / mean |a|^2"),
        ("rank_reach", "b--", "share of t in the rank-r subspace"),
        ("reproduced", "r-o", "share of t reproduced"),
    ):
        left.plot(x, [runs[widest][i][key] for i in layers], style, ms=3, label=label)
    left.set_ylim(-0.05, 1.05)
    left.set_xlabel("layer")
    left.set_ylabel("share")
    left.set_title(f"{widest}", fontsize=9)
    left.legend(fontsize=7)
    names = sorted(runs)
    mean = {
        key: [sum(layer[key] for layer in runs[n].values()) / len(runs[n]) for n in names]
        for key in ("rank_reach", "reproduced")
    }
    pos = range(len(names))
    right.bar([p - 0.2 for p in pos], mean["rank_reach"], 0.4, color="tab:blue", label="in rank-r subspace")
    right.bar([p + 0.2 for p in pos], [max(v, -0.5) for v in mean["reproduced"]], 0.4, color="tab:red",
              label="reproduced (cut at -0.5)")  # fmt: skip
    right.set_xticks(list(pos), [n.replace("layerwise-", "") for n in names], rotation=30, ha="right", fontsize=7)
    right.axhline(0, color="k", lw=0.5)
    right.set_title("mean over each run's layers", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle("What the NP update can and does reproduce of the attention residual t")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
