"""The paper's ablations (Tables 1 and 2) on the synthetic data: train, evaluate, tabulate.

    python scripts/ablations.py [--grid table2 table1] [--seeds 0 1 2] [--epochs N]
        [--max-steps N] [--train-batches N] [--data standard hard] [--set KEY=VALUE ...]
        [--out-dir outputs/ablations] [--report docs/ablations.md] [--rerun] [--dry-run]
        [--no-train] [--smoke]

Every row of the chosen grids is one ``python -m visstg.train`` run per seed and dataset, with
the same budget (``--epochs`` / ``--max-steps`` / ``--train-batches``, else the training
config's) and the row's overrides:

- ``table2``: the paper's Table 2, fusion (``model.fusion`` none | concat | relation) x
  association (``model.association`` embedding | offset | edge) x kernel propagation
  (``model.propagation``), trained single-scale as the paper's table is
  (``data.train_sizes=[test_size]``), with the paper's 3 GNN iterations;
- ``table1``: the GNN iterations sweep ``model.gnn.iterations=1..4`` (the default model).

Each run goes to ``OUT/<data>/<row>/seed<S>/`` (``hydra.run.dir``) with its log in
``train.log``; the final validation of its best checkpoint is read back from the
``metrics.json`` the training writes. A run whose ``metrics.json`` exists is not run again
(``--rerun`` forces it), so an interrupted grid continues where it stopped; one whose recorded
config differs from what the row composes to now (another budget, or a changed default) is an
error rather than a row of a mixed table.
``--no-train`` writes the report from the finished runs alone (e.g. after adding seeds to some
rows: ``--seeds 0 1 --no-train``).

``--data hard`` adds a harder synthetic dataset (its own ``data.root``; longer occlusions, more
same-class objects, faster motion: :data:`HARD`), where association quality matters more.

The report (``--report``, default ``docs/ablations.md``) has the paper's layout: per grid and
dataset, one row per variant with AP, AP50, AP75, AR1, AR10 (the official YouTube-VIS metric, in
percent), HOTA and AssA, mean +- standard deviation over the seeds, and the paper's AP beside
them; then how the measured order of the rows compares with the paper's, the command line, the
seeds, the budget and the data settings. Text below the report's notes marker (the last
generated line) is kept when the report is written again. ``--smoke`` runs a seconds-long
version of everything (tiny data, one batch) to test the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("AP", "AP50", "AP75", "AR1", "AR10", "HOTA", "AssA")


@dataclass(frozen=True)
class Row:
    """One variant: a name for its folder, its label columns, overrides and the paper's AP."""

    name: str
    labels: tuple[str, ...]
    overrides: tuple[str, ...]
    paper_ap: float | None = None


SINGLE_SCALE = "data.train_sizes=[${data.test_size}]"


def _t2(name, fusion, association, propagation, paper_ap):
    labels = (
        {"none": "No fusion", "concat": "Concat", "relation": "Relation"}[fusion],
        {"embedding": "Embedding", "offset": "Offset", "edge": "Edge feature"}[association],
        "yes" if propagation else "no",
    )
    overrides = (
        f"model.fusion={fusion}",
        f"model.association={association}",
        f"model.propagation={str(propagation).lower()}",
        # The paper's Table 2 is at its default L = 3 (the synthetic default now uses 1).
        "model.gnn.iterations=3",
        SINGLE_SCALE,
    )
    return Row(name, labels, overrides, paper_ap)


GRIDS: dict[str, dict] = {
    "table2": {
        "title": "Table 2: feature fusion, association and mask propagation",
        "columns": ("Feature fusion", "Association", "Propagation"),
        "rows": (
            _t2("none-embedding", "none", "embedding", False, 31.6),
            _t2("concat-embedding", "concat", "embedding", False, 32.1),
            _t2("relation-offset", "relation", "offset", False, 32.6),
            _t2("relation-embedding", "relation", "embedding", False, 33.4),
            _t2("relation-edge", "relation", "edge", False, 34.8),
            _t2("none-embedding-prop", "none", "embedding", True, 32.0),
            _t2("relation-embedding-prop", "relation", "embedding", True, 33.9),
            _t2("relation-edge-prop", "relation", "edge", True, 35.2),
        ),
    },
    "table1": {
        "title": "Table 1: GNN update iterations",
        "columns": ("Iterations",),
        "rows": tuple(
            Row(f"iterations{i}", (str(i),), (f"model.gnn.iterations={i}",), ap)
            for i, ap in zip(range(1, 5), (32.1, 35.3, 36.5, 36.0))
        ),
    },
}

# Everything after this line of an existing report is kept when the report is written again.
NOTES_MARKER = "<!-- notes below this line are kept when scripts/ablations.py rewrites the file -->"
# The harder synthetic dataset: more objects, mostly of one class, long occlusions, fast motion.
HARD = {
    "max_objects": 8,
    "same_class_prob": 0.9,
    "occlusion_prob": 0.8,
    "occlusion_frames": 6,
    "speed": 2.0,
}
# Seconds-long runs for --smoke: tiny videos, one training batch, small validation.
SMOKE = (
    "data.synthetic.train_videos=2",
    "data.synthetic.val_videos=1",
    "data.synthetic.height=64",
    "data.synthetic.width=96",
    "++data.synthetic.min_frames=3",
    "++data.synthetic.max_frames=4",
    "data.train_sizes=[64]",
    "data.test_size=64",
    "data.max_size=128",
    "data.batch_size=2",
    "data.num_workers=0",
)


def data_overrides(kind: str, smoke: bool, data_dir: Path | None) -> list[str]:
    """Overrides that select the standard or the hard synthetic dataset."""
    base = data_dir if data_dir is not None else "${paths.data_dir}"
    suffix = "_smoke" if smoke else ""
    if kind == "standard":
        out = [f"data.root={base}/synthetic{suffix}"] if (smoke or data_dir) else []
    else:
        out = [f"data.root={base}/synthetic_hard{suffix}"]
        out += [f"++data.synthetic.{k}={v}" for k, v in HARD.items()]
        if smoke:
            out.append("++data.synthetic.max_objects=3")
    return out + (list(SMOKE) if smoke else [])


@dataclass
class Result:
    row: Row
    data: str
    seed: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


_ABSENT = "<absent>"
# The parts of a run's config that decide its numbers; compared before a finished run is reused.
COMPARED = ("model", "data", "loss", "optimizer", "scheduler", "trainer", "tracker", "seed")


def config_differences(run_dir: Path, overrides: list[str]) -> list[str] | None:
    """Where a finished run's recorded config (Hydra's ``.hydra/config.yaml``) differs from
    the config ``overrides`` compose to now (``None`` without a record). Comparing configs,
    not override lists, also catches a default that changed since the run. Options the run's
    config does not have (added since) are not compared."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    from visstg.config import compose

    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    wanted = OmegaConf.to_container(compose("train", overrides), resolve=False)
    diffs: list[str] = []

    def walk(a, b, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}")
        elif a is _ABSENT:
            pass  # an option added since the run: its default is assumed to be the old behaviour
        elif a != b:
            diffs.append(f"{key}: run {a!r}, now {b!r}")

    for key in COMPARED:
        walk(recorded.get(key, _ABSENT), wanted.get(key, _ABSENT), key)
    return diffs


def run_one(
    cmd: list[str], run_dir: Path, rerun: bool, dry_run: bool, no_train: bool = False
) -> tuple[dict, float | None]:
    """Train + evaluate one run (unless its metrics exist); returns (val metrics, seconds).

    A finished run is reused only if it was trained with the config these overrides give now
    (another budget, data or default in the same ``--out-dir`` is an error, not a silently
    mixed table); ``no_train`` only reads finished runs (``{}`` for a missing one)."""
    summary = run_dir / "metrics.json"
    timing = run_dir / "ablation_time.json"
    if summary.exists() and not rerun:
        wanted = [a for a in cmd[cmd.index("visstg.train") + 1 :] if not a.startswith("hydra.")]
        diffs = config_differences(run_dir, wanted)
        if diffs:
            raise RuntimeError(
                f"{run_dir} holds a run trained with other settings ({'; '.join(diffs[:6])}); "
                "pass --rerun to replace it or choose another --out-dir"
            )
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        return json.loads(summary.read_text())["val"], seconds
    if no_train:
        return {}, None
    if dry_run:
        print(shlex.join(cmd))
        return {}, None
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        env = {**os.environ, "HYDRA_FULL_ERROR": "1"}  # the whole traceback in train.log
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not summary.exists():
        raise RuntimeError(f"exit status {proc.returncode}, see {run_dir / 'train.log'}")
    timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    return json.loads(summary.read_text())["val"], seconds


def fmt(values: list[float]) -> str:
    """Mean (+- sample std over seeds) in percent; '-' when the metric is missing."""
    vals = [100 * v for v in values if v is not None and v >= 0]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def mean_ap(results: list[Result]) -> float | None:
    aps = [r.metrics["AP"] for r in results if r.metrics.get("AP") is not None]
    return statistics.mean(aps) * 100 if aps else None


def order_comparison(rows: tuple[Row, ...], by_row: dict[str, list[Result]]) -> list[str]:
    """Pairs of rows the paper orders by AP: does the measured mean AP order them the same?"""
    lines, agree, ties, total = [], 0, 0, 0
    measured = {r.name: mean_ap(by_row.get(r.name, [])) for r in rows}
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a.paper_ap is None or b.paper_ap is None or a.paper_ap == b.paper_ap:
                continue
            ma, mb = measured[a.name], measured[b.name]
            if ma is None or mb is None:
                continue
            hi, lo = (a, b) if a.paper_ap > b.paper_ap else (b, a)
            total += 1
            if measured[hi.name] > measured[lo.name]:
                agree += 1
            elif measured[hi.name] == measured[lo.name]:
                ties += 1
            else:
                lines.append(
                    f"- paper: {' / '.join(hi.labels)} ({hi.paper_ap}) > "
                    f"{' / '.join(lo.labels)} ({lo.paper_ap}); measured: "
                    f"{measured[hi.name]:.1f} vs {measured[lo.name]:.1f}"
                )
    if total == 0:
        return ["No pair of rows with measured AP to compare."]
    head = (
        f"The measured mean AP orders {agree} of the {total} row pairs as the paper does "
        f"({ties} tied, {total - agree - ties} reversed)."
    )
    return [head, *(["", "Pairs in the reverse order:", "", *lines] if lines else [])]


def write_report(path: Path, args, results: list[Result], command: str, base: list[str]) -> None:
    lines = [
        "# Ablations on the synthetic data (paper Tables 1 and 2)",
        "",
        f"Generated by `scripts/ablations.py` on {datetime.date.today().isoformat()}"
        + (" (**smoke run: tiny data and budget, the numbers mean nothing**)" if args.smoke else "")
        + ".",
        "",
        "```",
        command,
        "```",
        "",
        f"- Seeds: {', '.join(map(str, args.seeds))} (one training run per seed; cells are the "
        "mean ± sample standard deviation over the seeds of the row's `seeds` column, the runs "
        "that exist).",
        f"- Budget per run (the same for every row): {budget_text(args)}.",
        f"- Overrides common to every run: `{' '.join(base) or '(none)'}`.",
        "- Metrics: the official YouTube-VIS AP / AR (in percent) and HOTA / AssA (trackeval) of "
        "the best checkpoint on the validation split, as `python -m visstg.train` reports them. "
        "The paper's column is its AP on YouTube-VIS 2019 validation (ResNet-50), for the order "
        "of the rows, not the magnitude.",
        "- Data: `standard` is the default synthetic dataset (`conf/data/synthetic.yaml`); "
        "`hard` is generated with "
        + ", ".join(f"`{k}={v}`" for k, v in HARD.items())
        + " (`python -m visstg.data.synthetic` options), in its own `data.root`.",
        "- Table 2 rows train single-scale (`data.train_sizes=[data.test_size]`) with 3 GNN "
        "iterations, as the paper's Table 2; Table 1 rows use the default multi-scale training.",
        "",
    ]
    for grid in args.grid:
        spec = GRIDS[grid]
        for data in args.data:
            sel = [r for r in results if r.data == data and r.row in spec["rows"]]
            by_row: dict[str, list[Result]] = {}
            for r in sel:
                if r.error is None and r.metrics:
                    by_row.setdefault(r.row.name, []).append(r)
            lines += [f"## {spec['title']} ({data} data)", ""]
            header = [*spec["columns"], *METRICS, "paper AP", "seeds", "minutes/run"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row in selected(spec["rows"], args.rows):
                rs = by_row.get(row.name, [])
                cells = [fmt([r.metrics.get(m) for r in rs]) for m in METRICS]
                secs = [r.seconds for r in rs if r.seconds is not None]
                minutes = f"{statistics.mean(secs) / 60:.1f}" if secs else "-"
                paper = f"{row.paper_ap:.1f}" if row.paper_ap is not None else "-"
                seeds = ", ".join(str(r.seed) for r in rs) or "-"
                lines.append("| " + " | ".join([*row.labels, *cells, paper, seeds, minutes]) + " |")
            rows = selected(spec["rows"], args.rows)
            lines += ["", *order_comparison(rows, by_row), ""]
            failed = [r for r in sel if r.error is not None]
            if failed:
                lines += ["Failed runs:", ""]
                lines += [f"- {r.row.name} seed {r.seed}: {r.error}" for r in failed]
                lines.append("")
    lines += [
        "Run folders: `" + str(args.out_dir) + "/<data>/<row>/seed<S>/` (train.log, metrics.json, "
        "checkpoints).",
        "",
    ]
    # Hand-written notes below the marker survive a rewrite of the report.
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    lines.append(NOTES_MARKER)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + notes)


def selected(rows: tuple[Row, ...], names: list[str] | None) -> tuple[Row, ...]:
    return tuple(r for r in rows if not names or r.name in names)


def budget_text(args) -> str:
    parts = []
    if args.epochs is not None:
        parts.append(f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}")
    if args.max_steps is not None:
        parts.append(f"at most {args.max_steps} optimiser steps")
    if args.train_batches is not None:
        parts.append(f"{args.train_batches} training batch(es) per epoch")
    return ", ".join(parts) or "the training config's (`conf/trainer`, `conf/data`)"


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python scripts/ablations.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--grid", nargs="+", choices=sorted(GRIDS), default=["table2", "table1"])
    p.add_argument("--rows", nargs="+", help="only these rows (names as in the run folders)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", nargs="+", choices=["standard", "hard"], default=["standard"])
    p.add_argument("--data-dir", type=Path, help="where the synthetic datasets live")
    p.add_argument("--epochs", type=int, help="trainer.max_epochs of every run")
    p.add_argument("--max-steps", type=int, help="trainer.max_steps of every run")
    p.add_argument("--train-batches", type=int, help="training batches per epoch")
    p.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run"
    )
    p.add_argument("--out-dir", type=Path, default=Path("outputs/ablations"))
    p.add_argument("--report", type=Path, default=Path("docs/ablations.md"))
    p.add_argument("--rerun", action="store_true", help="run again rows that have metrics")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="write the report from the finished runs in --out-dir only (missing ones: '-')",
    )
    p.add_argument("--smoke", action="store_true", help="tiny data and budget (tests)")
    args = p.parse_args(argv)
    known = {r.name for g in args.grid for r in GRIDS[g]["rows"]}
    unknown = sorted(set(args.rows or ()) - known)
    if unknown:
        p.error(f"unknown rows {unknown} for grids {args.grid}; rows: {sorted(known)}")
    if args.smoke:
        args.epochs = 1 if args.epochs is None else args.epochs
        args.train_batches = 1 if args.train_batches is None else args.train_batches
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The command that trains what the report shows (--no-train only re-reads the runs).
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-train"]
    command = shlex.join(["python", "scripts/ablations.py", *given])
    base = ["logger=csv", "callbacks.progress_bar=null", "evaluate_after_fit=true"]
    if args.smoke:
        base.append("model.dim=64")
    if args.epochs is not None:
        base.append(f"trainer.max_epochs={args.epochs}")
    if args.max_steps is not None:
        base.append(f"trainer.max_steps={args.max_steps}")
    if args.train_batches is not None:
        base.append(f"++trainer.limit_train_batches={args.train_batches}")
    base += args.set
    results: list[Result] = []
    for grid in args.grid:
        for row in GRIDS[grid]["rows"]:
            if row not in selected(GRIDS[grid]["rows"], args.rows):
                continue
            for data in args.data:
                for seed in args.seeds:
                    run_dir = (args.out_dir / data / row.name / f"seed{seed}").resolve()
                    cmd = [
                        sys.executable, "-m", "visstg.train",
                        *data_overrides(data, args.smoke, args.data_dir), *base,
                        *row.overrides, f"seed={seed}", f"hydra.run.dir={run_dir}",
                    ]  # fmt: skip
                    res = Result(row, data, seed, run_dir)
                    print(f"[ablations] {grid} {row.name} {data} seed {seed} -> {run_dir}")
                    try:
                        res.metrics, res.seconds = run_one(
                            cmd, run_dir, args.rerun, args.dry_run, args.no_train
                        )
                    except RuntimeError as err:
                        res.error = str(err)
                        print(f"[ablations]   failed: {err}", file=sys.stderr)
                    results.append(res)
    if args.dry_run:
        return 0
    failed = sum(1 for r in results if r.error)
    if args.no_train and failed and args.report.exists():
        # --no-train only re-reads runs: a run it cannot use (e.g. trained under settings that
        # have changed since) must not turn a finished report into a table of blanks.
        print(
            f"[ablations] {failed} of {len(results)} runs could not be used (above); "
            f"{args.report} is left as it was",
            file=sys.stderr,
        )
        return 1
    write_report(args.report, args, results, command, base)
    print(f"[ablations] wrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
