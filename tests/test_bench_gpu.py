"""The prepared GPU benchmark runs end to end on the CPU (`--smoke`: bundled data, two epochs), so a lent GPU's
few minutes are never lost to a broken script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_gpu_benchmark_runs_in_smoke_mode_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for case in ("sasrec", "sasrec_mhc", "tisasrec", "tisasrec_mhc", "sasrec_ml1m"):
        assert result["cases"][case]["epoch_s"] > 0 and result["cases"][case]["eval_s"] > 0, case
    assert set(result["targets"]) >= {"sasrec_ml1m.epoch_s", "ratio.tisasrec_mhc/sasrec"}
    assert all(t["value"] is not None for t in result["targets"].values())
    assert "| figure | value | target | met |" in done.stdout
