"""The training entry point: W&B offline logging, checkpoints, resume after a kill, seeds, sweeps,
DDP validation. Tiny settings; the long ones are marked slow (``make test-all``)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run on a tiny synthetic dataset generated under ``root``."""
    return [
        f"data.root={root}",
        "data.synthetic.train_videos=2",
        "data.synthetic.val_videos=2",
        "data.synthetic.height=64",
        "data.synthetic.width=96",
        "+data.synthetic.min_frames=4",
        "+data.synthetic.max_frames=5",
        "data.train_sizes=[64]",
        "data.test_size=64",
        "data.max_size=128",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.dim=16",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={out}",
        *extra,
    ]


def train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_default_run_logs_to_wandb_offline_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train(
        *tiny(
            tmp_path / "data", out, "+trainer.limit_train_batches=3", "trainer.log_every_n_steps=1"
        )
    )
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    assert f"best checkpoint: {out}/checkpoints/epoch_000.ckpt" in proc.stdout
    assert (out / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 3 and "AP" in summary["val"] and "HOTA" in summary["val"]
    # W&B wrote an offline run (no account, no network) holding the logged metrics
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (events,) = run_dir.glob("run-*.wandb")
    data = events.read_bytes()
    for key in (b"train/loss", b"train/loss_center", b"val/AP", b"val/HOTA", b"lr-"):
        assert key in data, key  # lr-<optimizer>: the learning-rate monitor
    assert b"val/overlay" in data  # overlay frames of a validation video


def test_same_seed_same_losses(tmp_path: Path) -> None:
    def losses(name: str) -> list[str]:
        out = tmp_path / name
        train(*tiny(tmp_path / "data", out, "logger=csv", "seed=7", "+trainer.limit_train_batches=3",
                    "evaluate_after_fit=false", "+trainer.limit_val_batches=0",
                    "trainer.log_every_n_steps=1"))  # fmt: skip
        (metrics,) = out.glob("csv/version_*/metrics.csv")
        rows = list(csv.DictReader(metrics.open()))
        return [r["train/loss"] for r in rows if r.get("train/loss")]

    first = losses("a")
    assert len(first) == 3 and first == losses("b")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_step_count(tmp_path: Path) -> None:
    common = tiny(tmp_path / "data", tmp_path / "x", "logger=csv", "trainer.max_epochs=3",
                  "callbacks.last_checkpoint.every_n_train_steps=1", "evaluate_after_fit=false")  # fmt: skip
    common = [a for a in common if not a.startswith("hydra.run.dir")]
    full = tmp_path / "full"
    train(*common, f"hydra.run.dir={full}")
    expected = json.loads((full / "metrics.json").read_text())["global_step"]
    assert expected > 2

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "visstg.train", *common, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert not (killed / "metrics.json").exists()

    train(*common, f"hydra.run.dir={killed}", f"ckpt_path={last}")
    resumed = json.loads((killed / "metrics.json").read_text())["global_step"]
    assert resumed == expected


def test_resume_checkpoint_of_another_model_is_refused_with_the_cause(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from visstg.inference import CheckpointError
    from visstg.train import check_resume_checkpoint

    net = nn.Linear(2, 3)
    path = tmp_path / "last.ckpt"
    stored = {"dim": 4, "gnn": {"iterations": 1}, "topk": 100}
    state = {"net.weight": torch.zeros(4, 2), "net.bias": torch.zeros(4)}
    torch.save({"state_dict": state, "visstg_config": {"model": stored}}, path)
    run = {"dim": 3, "gnn": {"iterations": 1}, "topk": 100}
    with pytest.raises(CheckpointError) as err:
        check_resume_checkpoint(str(path), net, run)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot resume")
    assert "weight: checkpoint (4, 2) vs model (3, 2)" in message
    assert "model.dim: 4 -> 3" in message and "iterations" not in message  # only what differs
    # The same network resumes (no error); a missing or unreadable file is named.
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    check_resume_checkpoint(str(path), net, run)
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint file does not exist"):
        check_resume_checkpoint(str(tmp_path / "missing.ckpt"), net, run)
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.ckpt: cannot read"):
        check_resume_checkpoint(str(tmp_path / "junk.ckpt"), net, run)


def test_train_reports_a_bad_ckpt_path_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.train", *tiny(tmp_path / "data", tmp_path / "run"),
         f"ckpt_path={missing}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"error: {missing}: checkpoint file does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_value_sweep_writes_a_summary(tmp_path: Path) -> None:
    overrides = [a for a in tiny(tmp_path / "data", tmp_path / "x", "logger=csv",
                                 "+trainer.limit_train_batches=2") if not a.startswith("hydra.run")]  # fmt: skip
    sweep = tmp_path / "sweep"
    train("-m", *overrides, f"hydra.sweep.dir={sweep}", "model.gnn.iterations=1,2")
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1" / "metrics.json").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["overrides"] for r in rows] == ["model.gnn.iterations=1", "model.gnn.iterations=2"]
    assert all(r["AP"] != "" for r in rows)
    assert "| run | overrides | AP |" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_ddp_validation_equals_single_process_evaluation(tmp_path: Path) -> None:
    """Two gloo processes each track a share of 3 videos (the sampler pads one duplicate); the
    gathered metric equals `visstg.evaluate` of the same checkpoint in one process."""
    out = tmp_path / "ddp"
    low = ["tracker.score_threshold=0", "tracker.new_track_threshold=0"]  # many tracks
    overrides = tiny(tmp_path / "data", out, "trainer=ddp_sim", "logger=csv",
                     "data.synthetic.val_videos=3", "+trainer.limit_train_batches=2", *low)  # fmt: skip
    train(*overrides)
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["val"]["num_videos"] == 3
    single = tmp_path / "single.json"
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.evaluate", f"ckpt_path={ddp['best_ckpt']}", f"output={single}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(single.read_text())
    assert expected["HOTA"] > 0  # a non-trivial comparison
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100", "HOTA", "DetA", "AssA"):
        assert ddp["val"][key] == pytest.approx(expected[key], abs=1e-12), key


def test_final_evaluation_reuses_the_last_validation_of_the_best_checkpoint(tmp_path: Path) -> None:
    import torch

    from visstg.train import _validated_already

    class Validator:
        last_metrics = {"AP": 0.5}

    class Module:
        validator = Validator()
        validated_step = 12

    ckpt = tmp_path / "best.ckpt"
    torch.save({"global_step": 12, "state_dict": {}}, ckpt)
    assert _validated_already(Module(), str(ckpt))  # validated after the best's last step
    torch.save({"global_step": 8, "state_dict": {}}, ckpt)
    assert not _validated_already(Module(), str(ckpt))  # an earlier epoch was best
    assert not _validated_already(Module(), None)  # no checkpointing: final weights
    Module.validated_step = None  # never validated during the fit
    torch.save({"global_step": 12, "state_dict": {}}, ckpt)
    assert not _validated_already(Module(), str(ckpt))


def test_bench_train_step_script_times_steps(tmp_path: Path) -> None:
    """scripts/bench_train_step.py runs the plain step loop of a config and reports it."""
    import subprocess
    import sys

    overrides = [o for o in tiny(tmp_path / "data", tmp_path / "x") if "hydra.run.dir" not in o]
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train_step.py"
    out = tmp_path / "bench.json"
    # Two timed steps cycle through the loader's batches; bf16 autocast around the step.
    proc = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--warmup", "0", "--precision", "bf16",
         "--output", str(out), *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 steps, batch 2" in proc.stdout and "s/step" in proc.stdout
    assert "steps/s, peak resident (process) memory" in proc.stdout
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["batch_size"] == 2 and report["precision"] == "bf16"
    assert report["steps_per_s"] == pytest.approx(1 / report["median_s_per_step"])
    assert report["peak_memory_mib"] > 0 and report["device"].startswith("cpu")
    # The report is not overwritten, and a bad precision is refused before anything is built.
    again = subprocess.run(
        [sys.executable, str(script), "--output", str(out), *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode != 0 and f"{out} exists" in again.stderr
    bad = subprocess.run(
        [sys.executable, str(script), "--precision", "fp8", *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "precision must be one of" in bad.stderr


def test_mask_head_health_script_reports_windows(tmp_path: Path) -> None:
    """scripts/mask_head_health.py runs the step loop with the run's schedule and reports the
    mask loss and constant-mask share per window, then when the loss fell under --below."""
    overrides = [o for o in tiny(tmp_path / "data", tmp_path / "x") if "hydra.run.dir" not in o]
    script = Path(__file__).resolve().parents[1] / "scripts" / "mask_head_health.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--every", "2", "--below", "100",
         "model.mask_negative_slope=0", *overrides],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "3 steps, batch 2, mask_negative_slope 0.0" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1-2 |") or
            line.startswith("| 3-3 |")]  # fmt: skip
    assert len(rows) == 2
    assert "mask loss under 100.0 (window mean) by step 2" in out


def test_constant_share_counts_flat_logit_maps(load_script) -> None:
    import torch

    health = load_script("mask_head_health")
    logits = torch.randn(4, 3, 5)
    logits[1] = 2.5
    logits[3] = -1.0
    assert health.constant_share(logits) == 0.5
    empty = health.constant_share(torch.zeros(0, 3, 5))
    assert empty != empty  # NaN: no instance in the batch, not "none constant"


def test_deterministic_trainer_does_not_fill_new_tensors(tmp_path: Path) -> None:
    """trainer.deterministic turns on deterministic algorithms but not their NaN-filling of new
    tensors (a debugging aid, no part of repeatability; build_trainer has the timings)."""
    import torch
    from omegaconf import OmegaConf

    from visstg.config import compose, resolved
    from visstg.train import build_trainer

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)  # fmt: skip
    try:
        for deterministic in (True, False):
            torch.utils.deterministic.fill_uninitialized_memory = True
            overrides = ["logger=none", f"trainer.deterministic={deterministic}",
                         f"paths.output_dir={tmp_path}"]  # fmt: skip
            build_trainer(OmegaConf.create(resolved(compose("train", overrides))))
            assert torch.are_deterministic_algorithms_enabled() is deterministic
            assert torch.utils.deterministic.fill_uninitialized_memory is not deterministic
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


@pytest.mark.parametrize(("upsample", "stride"), [(1, 4), (2, 2)])
def test_criterion_masks_follow_the_networks_mask_stride(upsample: int, stride: int) -> None:
    # The loss group does not say at which stride the mask logits come out; a criterion left at
    # 4 would crop stride-4 targets to a stride-2 logit map without complaint.
    from omegaconf import OmegaConf

    from visstg.config import compose, resolved
    from visstg.train import build_module

    overrides = ["model.dim=16", f"model.mask_upsample={upsample}"]
    module = build_module(OmegaConf.create(resolved(compose("train", overrides))))
    assert module.net.mask_stride == stride
    assert module.criterion.mask_target_stride == stride
