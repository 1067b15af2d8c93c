"""Hydra multirun summary: one table of every run's validation metrics in the sweep directory.

Enabled in ``conf/train.yaml`` as a Hydra callback. After ``python -m visstg.train -m
model.gnn.iterations=1,2,3,4`` it writes ``<sweep dir>/summary.md`` and ``summary.csv`` with one
row per run (its overrides, AP, AP50, AP75, AR1, AR10, HOTA, steps, best checkpoint), read from
each run's ``metrics.json`` (written by :func:`visstg.train.write_run_summary`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

__all__ = ["SweepSummary", "summarize_sweep"]

COLUMNS = ("AP", "AP50", "AP75", "AR1", "AR10", "HOTA")


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return list(yaml.safe_load(path.read_text()) or [])


def summarize_sweep(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write ``summary.md`` and ``summary.csv`` for the runs under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows: list[dict[str, Any]] = []
    runs = sorted(
        sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    )
    overrides = [_overrides(p.parent) for p in runs]
    # Only what differs between runs identifies a row; overrides shared by all are noise.
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    for metrics_path, ovr in zip(runs, overrides):
        run = json.loads(metrics_path.read_text())
        val = run.get("val") or {}
        varying = " ".join(o for o in ovr if o not in shared) or "(defaults)"
        row = {"run": metrics_path.parent.name, "overrides": varying}
        row.update({k: val.get(k) for k in COLUMNS})
        row.update(steps=run.get("global_step"), checkpoint=run.get("best_ckpt"))
        rows.append(row)
    if not rows:
        log.warning("no run of %s wrote metrics.json: no summary", sweep_dir)
        return None
    fields = ["run", "overrides", *COLUMNS, "steps", "checkpoint"]
    csv_path = sweep_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)

    lines = [
        f"# Sweep {sweep_dir}",
        "",
        "Validation metrics of each run (AP and AR in %, YouTube-VIS metric; HOTA from trackeval).",
        "",
        "| " + " | ".join(fields[:-1]) + " |",
        "|" + "---|" * (len(fields) - 1),
    ]
    lines += ["| " + " | ".join(cell(r[k]) for k in fields[:-1]) + " |" for r in rows]
    md_path = sweep_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md_path, csv_path


class SweepSummary(Callback):
    """Hydra callback: tabulate a multirun's results when it ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summarize_sweep(config.hydra.sweep.dir)
