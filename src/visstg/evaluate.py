"""Score a YouTube-VIS/OVIS results file: ``python -m visstg.evaluate gt=GT.json results=R.json``.

Prints the official 12-statistic table (plus OVIS occlusion AP/AR when the ground truth has
``occlusion`` labels, HOTA/DetA/AssA and per-category AP) and writes them to ``output`` as JSON.
Bad input stops with a one-line error naming the file. Scoring never imports torch.

Checkpoint mode (``ckpt_path=CKPT``: run inference on a split, then score) lives in
:func:`evaluate_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("visstg.evaluate")

# The package is installed editable from src/, so the config directory is found relative to
# this file (src/visstg/evaluate.py -> conf/), never relative to the current directory.
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")


def evaluate_files(
    gt: str, results: str, output: str | None = None, with_hota: bool = True
) -> dict:
    """Score ``results`` against ``gt``, print the table, write ``output``; returns the metrics."""
    from visstg.eval.table import format_table
    from visstg.eval.ytvis_eval import evaluate

    # One load and one set of per-frame intersections for both AP and HOTA.
    metrics = evaluate(gt, results, with_hota=with_hota)
    print(format_table(metrics))
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics written to %s", out)
    return metrics


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Checkpoint mode: inference on ``cfg.split`` with ``cfg.ckpt_path``, then scoring.

    Not implemented yet (a later issue); kept separate so that the scoring path stays free of
    torch and the model code.
    """
    raise NotImplementedError(
        f"ckpt_path={cfg.ckpt_path}: evaluating a checkpoint is not implemented yet; "
        "run inference to a results file and pass gt=... results=... instead"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from visstg.eval.results import EvalInputError

    logging.basicConfig(format="[%(levelname)s] %(message)s", level=logging.INFO, force=True)
    try:
        if cfg.ckpt_path:
            evaluate_checkpoint(cfg)
            return
        if not cfg.gt or not cfg.results:
            raise EvalInputError("give gt=GT.json and results=RESULTS.json (or ckpt_path=CKPT)")
        evaluate_files(cfg.gt, cfg.results, cfg.output, with_hota=cfg.hota)
    except (EvalInputError, NotImplementedError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
