"""The NPT study's plots: the frontier (perplexity ratio against NP parameters) and the
per-layer limits of the attention residual that the update can reproduce."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.lines import Line2D  # noqa: E402

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
        ax.scatter(r["np_parameters"], r["ppl_ratio"], color=color, marker=MARKERS.get(r["layer_set"], "x"))
        xy = (r["np_parameters"], r["ppl_ratio"])
        lr = "" if r["lr"] == result["settings"]["lr"] else f" lr {r['lr']:g}"
        ax.annotate(f"r{r['rank']}{lr}", xy, fontsize=6, xytext=(3, 2), textcoords="offset points")
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
    """Per layer: the odd share of the attention residual (out of reach at any rank), the
    share inside each run's first-order subspace, and the share each run reproduces."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, limits) in enumerate(sorted(result["limits"].items())):
        layers = sorted(limits, key=int)
        x = [int(i) for i in layers]
        color = f"C{k}"
        if k == 0:
            ax.plot(x, [limits[i]["odd_share"] for i in layers], "k-", lw=2, label="odd share of t (any rank)")
            ax.plot(x, [limits[i]["attention_share"] for i in layers], "k:", label="|t|^2 / |layer change|^2")
        ax.plot(x, [limits[i]["rank_reach"] for i in layers], "--", color=color, label=f"{name}: in rank-r reach")
        ax.plot(x, [limits[i]["reproduced"] for i in layers], "-o", ms=3, color=color, label=f"{name}: reproduced")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of |attention residual t|^2")
    ax.set_title("What the NP update can and does reproduce of the attention residual")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
