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
    gt: str,
    results: str,
    output: str | None = None,
    with_hota: bool = True,
    workers: int | None = None,
    class_agnostic: bool = False,
) -> dict:
    """Score ``results`` against ``gt``, print the table, write ``output``; returns the metrics.

    ``workers``: processes sharing the per-video work, ``None`` one per available core (the
    numbers do not depend on it; see :func:`visstg.eval.parallel.map_forked`).
    ``class_agnostic``: every track of both files counted as one category (a diagnostic).
    """
    from visstg.eval.table import format_table
    from visstg.eval.ytvis_eval import evaluate

    # One load and one set of per-frame intersections for both AP and HOTA.
    metrics = evaluate(
        gt, results, with_hota=with_hota, workers=workers, class_agnostic=class_agnostic
    )
    if class_agnostic:
        print("class-agnostic: every category of the ground truth and the results scored as one")
        metrics["class_agnostic"] = True
    print(format_table(metrics))
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics written to %s", out)
    return metrics


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Checkpoint mode: inference on ``cfg.split`` with ``cfg.ckpt_path``, then scoring.

    The data is the checkpoint's training data config unless ``data=NAME`` picks another;
    ``data.root=DIR`` points it at another copy in the same layout, and ``test_size`` /
    ``max_size`` change the size the frames are resized to. A split without ground truth gets
    its results JSON and submission zip written instead of metrics.
    """
    from omegaconf import OmegaConf

    from visstg.cli import checkpoint_overrides, resolve_device
    from visstg.eval.results import make_submission_zip, write_results
    from visstg.inference import (
        autocast_context,
        infer_split,
        load_checkpoint,
        optimise_for_inference,
    )
    from visstg.validation import restrict_gt

    output = Path(cfg.output) if cfg.output else None
    results_path = (
        Path(cfg.results)
        if cfg.results
        else (output or Path("metrics.json")).with_name(f"{cfg.split}_results.json")
    )
    if results_path.exists() and not cfg.get("overwrite"):
        raise FileExistsError(
            f"{results_path} exists; pass results=OTHER.json or overwrite=true to replace it"
        )
    device = resolve_device(cfg.get("device", "auto"))
    precision = cfg.get("precision", "fp32")
    autocast_context(device, precision)  # a bad precision fails before anything is loaded
    model = load_checkpoint(cfg.ckpt_path, device, model_overrides=checkpoint_overrides(cfg))
    if cfg.get("channels_last"):
        model.net = optimise_for_inference(model.net, device, channels_last=True, fuse_norms=False)
    chosen = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    data_cfg = dict(model.config["data"]) if not chosen.get("name") else chosen
    if chosen.get("root"):
        data_cfg["root"] = chosen["root"]
    for key in ("test_size", "max_size"):
        if cfg.get(key):
            data_cfg[key] = cfg[key]
    tracker = OmegaConf.to_container(cfg.tracker, resolve=True) if cfg.get("tracker") else None
    ds, results = infer_split(
        model, data_cfg, cfg.split, tracker, device, cfg.get("max_videos"), precision
    )

    results_path.parent.mkdir(parents=True, exist_ok=True)
    write_results(results, results_path)
    if not ds.has_annotations:
        zip_path = make_submission_zip(results_path, results_path.with_suffix(".zip"))
        print(
            f"{ds.path} has no ground truth: wrote the results to {results_path} and the "
            f"submission archive to {zip_path} (upload it to the evaluation server)"
        )
        return {}
    with open(ds.path) as f:
        gt = json.load(f)
    if cfg.get("max_videos") is not None:  # score only the videos that were run
        gt = restrict_gt(gt, {v["id"] for v in ds.videos[: cfg.max_videos]})
    print(f"results of {len(gt['videos'])} videos written to {results_path}")
    # One process unless workers=N: this one holds torch (and maybe CUDA), unsafe to fork.
    workers = cfg.get("workers")
    return evaluate_files(
        gt, str(results_path), cfg.output, cfg.hota, 1 if workers is None else workers,
        bool(cfg.get("class_agnostic")),
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from visstg.eval.results import EvalInputError

    logging.basicConfig(format="[%(levelname)s] %(message)s", level=logging.INFO, force=True)
    try:
        if cfg.ckpt_path:
            from visstg.cli import exit_on_user_error

            exit_on_user_error(evaluate_checkpoint, cfg)
            return
        if not cfg.gt or not cfg.results:
            raise EvalInputError("give gt=GT.json and results=RESULTS.json (or ckpt_path=CKPT)")
        # workers=N: processes for the scoring, default (null) one per core.
        evaluate_files(
            cfg.gt, cfg.results, cfg.output, cfg.hota, cfg.get("workers"),
            bool(cfg.get("class_agnostic")),
        )  # fmt: skip
    except (EvalInputError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
