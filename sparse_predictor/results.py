"""``metrics.json``: one file per output directory, shared by both predictor kinds.

MLP results (DejaVu's main predictor) sit at the top level as ``layers`` and ``config``;
attention results have the same shape under ``att``. A run replaces only its own kind's
section, so training ``--kind mlp`` and ``--kind att`` into one directory gives one report."""

from __future__ import annotations

import json
from pathlib import Path

from engine.atomic import write_json_atomic

METRICS_FILE = "metrics.json"
#: 2: metrics measured on held-out test rows, with ``val_at_best_epoch`` and ``split``.
FORMAT = 2


def read_metrics(out_dir: str | Path) -> dict:
    path = Path(out_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics (run python -m sparse_predictor.train first)") from None
    if metrics.get("format") != FORMAT:
        raise ValueError(f"{path}: format {metrics.get('format')!r}, written by an older trainer; train again")
    return metrics


def section(metrics: dict, kind: str) -> dict | None:
    """``{"layers", "config"}`` of one predictor kind, or None when it was not trained."""
    if kind == "mlp":
        return {"layers": metrics["layers"], "config": metrics["config"]} if "layers" in metrics else None
    return metrics.get(kind)


def write_metrics(out_dir: str | Path, kind: str, layers: dict, config: dict, drift: dict | None) -> Path:
    """Store one kind's results next to what another kind's run left, atomically;
    ``drift`` None keeps what is there (a run's finished layers, before drift is measured)."""
    path = Path(out_dir) / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if metrics.get("format") != FORMAT:  # an older trainer's sections cannot be reported beside ours
        metrics = {}
    entry = {"layers": layers, "config": config}
    if kind == "mlp":
        metrics.update(entry)
    else:
        metrics[kind] = entry
    metrics["format"] = FORMAT
    if drift is not None:
        metrics["drift"] = drift
    write_json_atomic(path, metrics)
    return path
