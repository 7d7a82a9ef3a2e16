"""The prepared GPU benchmark runs end to end on the CPU (`--smoke`: bundled data, two epochs), so a lent GPU's
few minutes are never lost to a broken script; a case that does not fit in the budget is skipped and listed."""

from __future__ import annotations

import argparse
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
    cases = ("sasrec", "sasrec_mhc", "tisasrec", "tisasrec_mhc", "sasrec_ml1m", "tisasrec_nondeterministic")
    for case in cases:
        assert result["cases"][case]["epoch_s"] > 0 and result["cases"][case]["eval_s"] > 0, case
    assert set(result["targets"]) >= {"sasrec_ml1m.epoch_s", "ratio.tisasrec_mhc/sasrec"}
    assert result["figures"]["ratio.sasrec/sasrec_nondeterministic"] > 0  # what determinism costs
    assert "trainer.deterministic=false" in result["cases"]["sasrec_nondeterministic"]["command"]
    assert not result["skipped"]
    assert all(t["value"] is not None for t in result["targets"].values())
    assert "| figure | value | target | met |" in done.stdout


def test_cases_that_do_not_fit_the_budget_are_skipped_and_listed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_gpu

    ran = []
    monkeypatch.setattr(bench_gpu, "train", lambda overrides, run_dir, limit: ran.append(limit) or {"error": "x"})
    args = argparse.Namespace(smoke=False, data=tmp_path, epochs=4, timeout_s=300, budget_s=1, skip_quality=False)
    result = bench_gpu.measure(args)
    assert not ran and set(result["skipped"]) >= {"sasrec_ml1m", "tisasrec_compiled", "quality_tisasrec_mhc_recipe"}
