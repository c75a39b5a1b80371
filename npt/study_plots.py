"""The NPT study's plots: the frontier (perplexity ratio against NP parameters) and the
per-layer limits of the attention residual that the update can reproduce."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

MARKERS = {"last1": "o", "last2": "s", "last4": "^", "upper_half": "D"}
COLORS = {
    ("layerwise", "gate"): "tab:blue",
    ("end-to-end", "gate"): "tab:orange",
    ("layerwise", "gate_up"): "tab:green",
    ("end-to-end", "gate_up"): "tab:red",
}


def plot_frontier(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in result["points"]:
        key = (r["mode"], r["target"])
        label = f"{r['mode']}, W_in = {r['target']}" if key not in seen else None
        seen.add(key)
        ax.scatter(
            r["np_parameters"], r["ppl_ratio"], c=COLORS.get(key, "gray"), marker=MARKERS.get(r["layer_set"], "x")
        )
        ax.scatter([], [], c=COLORS.get(key, "gray"), label=label) if label else None
        ax.annotate(
            f"r{r['rank']}", (r["np_parameters"], r["ppl_ratio"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
        )
    front = [r for r in result["points"] if r["run"] + ":" + r["layer_set"] in result["frontier"]]
    ax.plot([r["np_parameters"] for r in front], [r["ppl_ratio"] for r in front], "k--", lw=0.8, label="frontier")
    ax.axhline(result["ratio_goal"], color="green", lw=0.8, ls=":", label=f"seeds' goal {result['ratio_goal']}")
    for name, marker in MARKERS.items():
        ax.scatter([], [], c="none", edgecolors="black", marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NP parameters")
    ax.set_ylabel("perplexity NPT / base")
    steps = result["settings"]["steps"]
    ax.set_title(
        f"NPT equivalence after {steps} steps ({Path(result['model']).name}, base ppl {result['ppl_base']:.1f})"
    )
    ax.legend(fontsize=7, ncol=2)
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
