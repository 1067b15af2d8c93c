"""scripts/ablations.py: the grid's commands, and (slow) a smoke run that trains, evaluates and
writes the report in the paper's layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablations.py"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def test_dry_run_lists_one_command_per_row_seed_and_dataset(tmp_path: Path) -> None:
    proc = run("--dry-run", "--seeds", "3", "5", "--data", "standard", "hard", "--epochs", "2",
               "--out-dir", str(tmp_path / "out"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmds = [line for line in proc.stdout.splitlines() if "-m visstg.train" in line]
    assert len(cmds) == (8 + 4) * 2 * 2
    t2 = [c for c in cmds if "model.fusion=concat" in c]
    assert len(t2) == 4 and all("model.association=embedding" in c for c in t2)
    assert all("trainer.max_epochs=2" in c for c in cmds)
    assert sum("seed=5" in c for c in cmds) == len(cmds) // 2
    hard = [c for c in cmds if "synthetic_hard" in c]
    assert len(hard) == len(cmds) // 2
    assert all("++data.synthetic.occlusion_frames=6" in c for c in hard)
    assert sum("model.gnn.iterations=4" in c for c in cmds) == 4
    bad = run("--rows", "nope", "--dry-run", cwd=tmp_path)
    assert bad.returncode != 0 and "unknown rows" in bad.stderr


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "ablations.md"
    args = ["--smoke", "--grid", "table2", "--rows", "relation-offset", "--seeds", "0",
            "--data", "standard", "hard", "--out-dir", str(tmp_path / "runs"),
            "--data-dir", str(tmp_path / "data"), "--report", str(report)]  # fmt: skip
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = report.read_text()
    assert (
        "| Feature fusion | Association | Propagation | AP | AP50 | AP75 | AR1 | AR10 | HOTA"
        in text
    )
    assert "| Relation | Offset | no | " in text and "32.6" in text
    assert "(standard data)" in text and "(hard data)" in text
    assert "python scripts/ablations.py --smoke" in text and "Seeds: 0" in text
    for data in ("standard", "hard"):
        assert (tmp_path / "runs" / data / "relation-offset" / "seed0" / "metrics.json").is_file()
    assert (tmp_path / "data" / "synthetic_hard_smoke" / "valid.json").is_file()
    # A second call reuses the finished runs (no training) and writes the same table.
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0 and report.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]


def fake_finished_runs(tmp_path: Path, rows: dict[str, float]) -> dict[str, list[str]]:
    """Finished runs (metrics.json + Hydra's config.yaml) of Table 1 rows, built from the
    commands a dry run prints; returns each row's overrides."""
    import shlex

    from omegaconf import OmegaConf

    from visstg.config import compose

    proc = run("--dry-run", "--grid", "table1", "--seeds", "0", "--epochs", "2",
               "--out-dir", str(tmp_path / "out"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    overrides = {}
    for line in proc.stdout.splitlines():
        if "-m visstg.train" not in line:
            continue
        args = shlex.split(line)
        args = args[args.index("visstg.train") + 1 :]
        run_dir = Path(next(a for a in args if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        overrides[run_dir.parent.name] = [a for a in args if not a.startswith("hydra.")]
        if run_dir.parent.name in rows:
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(
                compose("train", overrides[run_dir.parent.name]), run_dir / ".hydra" / "config.yaml"
            )
            ap = rows[run_dir.parent.name]
            (run_dir / "metrics.json").write_text(json.dumps({"val": {"AP": ap, "AP50": 2 * ap}}))
    return overrides


def test_report_from_finished_runs_keeps_notes_and_refuses_other_settings(tmp_path: Path):
    from omegaconf import OmegaConf

    overrides = fake_finished_runs(tmp_path, {"iterations1": 0.25, "iterations2": 0.125})
    assert len(overrides) == 4
    report = tmp_path / "ablations.md"
    marker = "<!-- notes below this line are kept when scripts/ablations.py rewrites the file -->"
    report.write_text(f"old table\n{marker}\n## My reading\nhand-written\n")
    args = ["--grid", "table1", "--seeds", "0", "--epochs", "2", "--no-train",
            "--out-dir", str(tmp_path / "out"), "--report", str(report)]  # fmt: skip
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert "old table" not in text and text.endswith(f"{marker}\n## My reading\nhand-written\n")
    assert "| Iterations | AP | AP50 | AP75 | AR1 | AR10 | HOTA | AssA | paper AP | seeds |" in text
    assert "| 1 | 25.0 | 50.0 | - | - | - | - | - | 32.1 | 0 | - |" in text
    assert "| 2 | 12.5 | 25.0 |" in text
    assert "| 4 | - | - | - | - | - | - | - | 36.0 | - | - |" in text  # not run: not trained
    # The report names the command that trains its runs.
    assert "python scripts/ablations.py --grid table1 --seeds 0 --epochs 2 --out-dir" in text
    assert "--no-train" not in text
    assert not (tmp_path / "out" / "standard" / "iterations4" / "seed0").exists()

    # A finished run trained with another budget (or under another default) is not mixed in.
    other = tmp_path / "out" / "standard" / "iterations2" / "seed0" / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(other)
    del cfg.model.graph["windows"]  # an option added since the run is not compared ...
    OmegaConf.save(cfg, other)
    assert run(*args, cwd=tmp_path).returncode == 0
    cfg.trainer.max_epochs = 3  # ... a value that differs is
    OmegaConf.save(cfg, other)
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert "iterations2" in proc.stderr and "other settings" in proc.stderr
    assert "trainer.max_epochs: run 3, now 2" in proc.stderr
    # --no-train leaves the finished report as it was rather than blanking the refused row.
    assert "left as it was" in proc.stderr and report.read_text() == text
