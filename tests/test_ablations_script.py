"""scripts/ablations.py: the grid's commands, and (slow) a smoke run that trains, evaluates and
writes the report in the paper's layout."""

from __future__ import annotations

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
