"""The predictability study's tables (``study.md``) and plots, drawn from ``study.json`` alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import NullFormatter, PercentFormatter  # noqa: E402

from engine.atomic import atomic_write  # noqa: E402
from sparse_predictor.report import LLAMA3_8B_RECALL, NAN, OPT_RECALL, fmt, new_axes, save_plot  # noqa: E402

TABLES_FILE = "study.md"
RECALL_AT_TRUE = "recall_at_true_sparsity"


def _layers(result: dict) -> list[int]:
    return [int(layer) for layer in result["layers"]]


def _values(result: dict, key: str) -> list[float]:
    return [NAN if e[key] is None else e[key] for e in result["layers"].values()]


def _layer_colors(layers: list[int]):
    cmap = plt.get_cmap("viridis")
    top = max(max(layers), 1)
    return {layer: cmap(layer / top) for layer in layers}


def _colorbar(fig: plt.Figure, ax: plt.Axes, layers: list[int]) -> None:
    mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, max(max(layers), 1)))
    fig.colorbar(mappable, ax=ax, label="layer")


def plot_sparsity(study: dict, path: Path) -> Path:
    """Recall at matched sparsity against the true sparsity of the labels, one line per layer."""
    by_target = study["sparsity"]["by_target"]
    fig, ax = new_axes(
        f"Recall vs true sparsity (rank {study['sparsity']['rank']}, test rows)",
        xlabel="true sparsity (fraction of MLP units inactive)",
        ylabel="recall @ true sparsity",
    )
    layers = _layers(next(iter(by_target.values())))
    colors = _layer_colors(layers)
    for layer in layers:
        entries = [r["layers"][str(layer)] for r in by_target.values()]
        ax.plot(
            [e["true_sparsity"] for e in entries],
            [e[RECALL_AT_TRUE] for e in entries],
            "-",
            lw=0.8,
            color=colors[layer],
            alpha=0.8,
        )
    means = [r["mean"] for r in by_target.values()]
    ax.plot([m["true_sparsity"] for m in means], [m[RECALL_AT_TRUE] for m in means], "ko-", lw=2, label="mean")
    xs = [m["true_sparsity"] for m in means]
    ax.plot(xs, [1 - s for s in xs], "k:", label="random choice (1 - sparsity)")
    _colorbar(fig, ax, layers)
    return path.parent / save_plot(fig, ax, path)


def plot_rank(study: dict, path: Path) -> Path:
    """Mean recall (and the layers' range) against the predictor's weights relative to the MLP's."""
    by_rank = study["rank"]["by_rank"]
    fig, ax = new_axes(
        f"Predictor size vs recall (sparsity {study['rank']['sparsity']}, test rows)",
        xlabel="predictor weights / MLP weights",
        ylabel="recall",
    )
    ratios = [r["weight_ratio"] for r in by_rank.values()]
    ax.plot(ratios, [r["mean"][RECALL_AT_TRUE] for r in by_rank.values()], "o-", label="recall @ true sparsity: mean")
    per_layer = [_values(r, RECALL_AT_TRUE) for r in by_rank.values()]
    low, high = [min(v) for v in per_layer], [max(v) for v in per_layer]
    ax.fill_between(ratios, low, high, alpha=0.2, label="its layers' range")
    ax.plot(ratios, [r["mean"]["recall"] for r in by_rank.values()], "s--", label="recall (logit >= 0): mean")
    for rank, ratio in zip(by_rank, ratios, strict=True):
        ax.annotate(f"rank {rank}", (ratio, 0.5), ha="center", fontsize=8)
    ax.axhspan(*OPT_RECALL, color="tab:green", alpha=0.12, label="DejaVu on OPT (93-99%)")
    ax.axhspan(*LLAMA3_8B_RECALL, color="tab:red", alpha=0.08, label="reported on Llama 3 8B (60-70%)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ratios)
    ax.set_xlim(ratios[0] / 1.4, ratios[-1] * 1.4)
    return path.parent / save_plot(fig, ax, path)


def plot_drift(study: dict, path: Path) -> Path:
    """Each layer's drift to the next layer against its predictors' recall."""
    drift = study["drift"]
    first = next(c for c in drift["correlations"] if c["recall"] == "standard recall@true")
    title = f"Drift vs recall: Spearman rho {first['rho']:.2f}, p = {first['p_value']:.2g} (standard)"
    fig, ax = new_axes(title, xlabel=f"drift to the next layer: {first['drift']}", ylabel="recall @ true sparsity")
    series = (
        ("o", "standard (MLP input)", study["base"]),
        ("x", "lookahead (layer input)", study["lookahead"]["lookahead"]),
    )
    for marker, label, result in series:
        layers = [str(layer) for layer in first["layers"] if str(layer) in result["layers"]]
        x = [1 - drift["layers"][layer]["cos_next"] for layer in layers]
        y = [result["layers"][layer][RECALL_AT_TRUE] for layer in layers]
        ax.scatter(
            x,
            y,
            c=[int(k) for k in layers],
            marker=marker,
            cmap="viridis",
            vmin=0,
            vmax=max(first["layers"]),
            label=label,
        )
        for xi, yi, layer in zip(x, y, layers, strict=True):
            ax.annotate(layer, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")  # layer 0's drift (the residual stream's massive channels appearing) dwarfs the rest
    ax.autoscale(axis="y")
    _colorbar(fig, ax, first["layers"])
    return path.parent / save_plot(fig, ax, path)


def plot_lookahead(study: dict, path: Path) -> Path:
    fig, ax = new_axes("Lookahead (layer input) vs standard (MLP input) predictor, test rows", ylabel="recall")
    for name, result in study["lookahead"].items():
        ax.plot(_layers(result), _values(result, RECALL_AT_TRUE), "o-", ms=3, label=f"{name}: recall @ true sparsity")
        ax.plot(_layers(result), _values(result, "recall"), "s--", ms=3, label=f"{name}: recall (logit >= 0)")
    return path.parent / save_plot(fig, ax, path)


def plot_heads(study: dict, path: Path) -> Path:
    fig, ax = new_axes("Attention-head predictor: recall when keeping the top heads, test rows", ylabel="recall")
    for keep, result in study["att"].items():
        (line,) = ax.plot(
            _layers(result),
            _values(result, RECALL_AT_TRUE),
            "o-",
            ms=3,
            label=f"{float(keep):.0%}: top {result['heads_kept']} of {study['model']['num_heads']} heads",
        )
        fraction = result["heads_kept"] / study["model"]["num_heads"]
        ax.axhline(fraction, color=line.get_color(), ls=":", lw=1)
    ax.plot([], [], "k:", label="random choice (fraction kept)")
    return path.parent / save_plot(fig, ax, path)


def write_plots(study: dict, out: Path) -> list[Path]:
    return [
        plot_sparsity(study, out / "recall_vs_sparsity.png"),
        plot_rank(study, out / "recall_vs_rank.png"),
        plot_drift(study, out / "drift_vs_recall.png"),
        plot_lookahead(study, out / "lookahead_vs_standard.png"),
        plot_heads(study, out / "attention_heads.png"),
    ]


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _per_layer_table(columns: dict[str, dict], key: str) -> list[str]:
    """One row per layer, one column per result, ``key``'s value; the mean last."""
    layers = sorted({layer for c in columns.values() for layer in _layers(c)})
    lines = [_row(["layer", *columns]), _row(["---:"] * (len(columns) + 1))]
    for layer in layers:  # n/a: a column without this layer (an unfinished piece)
        lines.append(_row([layer, *(fmt(c["layers"].get(str(layer), {}).get(key)) for c in columns.values())]))
    lines.append(_row(["**mean**", *(f"**{fmt(c['mean'][key])}**" for c in columns.values())]))
    return lines


def base_table(study: dict) -> list[str]:
    """The base predictor and the drift, layer by layer: what the correlations are over."""
    base, drift = study["base"], study["drift"]
    lines = [f"### Base predictor (rank {base['rank']}, sparsity {base['sparsity']}) and drift per layer", ""]
    header = ["layer", "recall", "recall @ true", "classifier sparsity", "1 - cos(l, l+1)"]
    header += [f"1 - cos(l, {drift['first_layer']})", "1 - cos(att_x, mlp_x)"]
    lines += [_row(header), _row(["---:"] * len(header))]
    for layer, e in base["layers"].items():
        d = drift["layers"][layer]
        cells = [fmt(e["recall"]), fmt(e[RECALL_AT_TRUE]), fmt(e["classifier_sparsity"])]
        cells += [fmt(None if d["cos_next"] is None else 1 - d["cos_next"]), fmt(1 - d["cos_first"])]
        lines.append(_row([layer, *cells, fmt(1 - d["cos_mlp"])]))
    m = base["mean"]
    means = [f"**{fmt(m[k])}**" for k in ("recall", RECALL_AT_TRUE, "classifier_sparsity")]
    return [*lines, _row(["**mean**", *means, "", "", ""])]


def tables(study: dict) -> list[str]:
    sparsity, rank = study["sparsity"], study["rank"]
    by_target = {f"s={float(s):.0%}": r for s, r in sparsity["by_target"].items()}
    lines = [*base_table(study), ""]
    lines += [f"### Recall @ true sparsity per layer and target sparsity (rank {sparsity['rank']})", ""]
    lines += _per_layer_table(by_target, RECALL_AT_TRUE)
    lines += ["", "Mean over layers per target sparsity:", ""]
    lines += [_row(["target", "true sparsity", "recall", "precision", "recall @ true", "random choice"])]
    lines += [_row(["---:"] * 6)]
    for s, r in sparsity["by_target"].items():
        m = r["mean"]
        lines.append(
            _row(
                [
                    f"{float(s):.0%}",
                    fmt(m["true_sparsity"]),
                    fmt(m["recall"]),
                    fmt(m["precision"]),
                    fmt(m[RECALL_AT_TRUE]),
                    fmt(1 - m["true_sparsity"]),
                ]
            )
        )
    lines += ["", f"### Predictor size (sparsity {rank['sparsity']}; MLP weights {study['mlp_weights']:,})", ""]
    lines += [_row(["rank", "weights", "/ MLP", "recall", "recall @ true", "worst layer @ true", "best layer @ true"])]
    lines += [_row(["---:"] * 7)]
    for r, res in rank["by_rank"].items():
        values = _values(res, RECALL_AT_TRUE)
        lines.append(
            _row(
                [
                    r,
                    f"{res['weights']:,}",
                    f"{res['weight_ratio']:.1%}",
                    fmt(res["mean"]["recall"]),
                    fmt(res["mean"][RECALL_AT_TRUE]),
                    fmt(min(values)),
                    fmt(max(values)),
                ]
            )
        )
    lines += ["", "Per layer, recall @ true sparsity:", ""]
    lines += _per_layer_table({f"rank {r}": res for r, res in rank["by_rank"].items()}, RECALL_AT_TRUE)
    lines += ["", "### Drift vs recall (Spearman over layers)", ""]
    lines += [_row(["drift", "recall", "layers", "rho", "p"]), _row(["---", "---", "---:", "---:", "---:"])]
    for c in study["drift"]["correlations"]:
        lines.append(_row([c["drift"], c["recall"], c["n"], fmt(c["rho"]), fmt(c["p_value"], ".2g")]))
    lines += ["", f"p: two-sided, {study['drift']['correlations'][0]['p_method']}.", ""]
    lines += ["### Lookahead vs standard predictor", ""]
    look = study["lookahead"]
    lines += _per_layer_table({f"{k} recall@true": v for k, v in look.items()}, RECALL_AT_TRUE)
    lines += ["", "### Attention heads: recall keeping the predicted top heads", ""]
    lines += _per_layer_table(
        {f"{float(k):.0%}: top {v['heads_kept']}": v for k, v in study["att"].items()}, RECALL_AT_TRUE
    )
    seconds = study["piece_seconds"]
    lines += ["", "### Time", "", _row(["piece", "seconds"]), _row(["---", "---:"])]
    lines += [_row([name, f"{s:.0f}"]) for name, s in seconds.items()]
    lines += [_row(["**total**", f"**{study['total_seconds']:.0f}**"])]
    return lines


def write_tables(study: dict, out: Path) -> Path:
    path = out / TABLES_FILE
    with atomic_write(path) as f:
        f.write("\n".join(tables(study)) + "\n")
    return path
