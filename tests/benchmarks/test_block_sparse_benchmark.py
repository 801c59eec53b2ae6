"""benchmarks/block_sparse_attention.py end to end on a tiny problem: every case is checked against
fp64 attention_ref before it is timed, and the JSON holds one row per (kind, density) and a dense row."""
import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "block_sparse_attention.py"


def test_tiny_run_writes_checked_rows(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--L", "300", "--H", "2", "--D", "16", "--block", "64",
           "--density", "0.3", "1.0", "--kinds", "jvp", "bwd", "--backends", "cpp", "reference", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "vs ideal" in out.stdout
    rows = json.loads((tmp_path / "block_sparse_attention.json").read_text())["results"]
    assert [(r["backend"], r["kind"], r["density"] is None) for r in rows] == [
        (b, k, dense) for b in ("cpp", "reference") for k in ("jvp", "bwd") for dense in (True, False, False)]
    assert all(r["time_s"] > 0 for r in rows)
    sparse = [r["density"] for r in rows if r["density"] is not None]
    assert min(sparse) < 0.5 and max(sparse) == 1.0  # 5 x 5 blocks: the diagonal and 3 more of 25
