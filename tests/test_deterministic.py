"""trainer.deterministic: what it sets and when (CPU), the one-line refusal of an operation without a deterministic
implementation, and two CUDA runs that agree bit for bit (gpu marker)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from seqrec import compose
from seqrec.run import main
from tests.conftest import TINY, compose_config, train_cli


@pytest.fixture
def process_flags():
    """Leave the process-wide flags as they were, whatever the test sets."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def test_deterministic_mode_is_strict_and_fixes_the_cublas_workspace(tmp_path, monkeypatch, process_flags):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    compose.set_process_flags(compose_config(TINY + ["trainer.deterministic=true"], tmp_path))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one stops the run
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    compose.set_process_flags(compose_config(TINY + ["trainer.deterministic=false"], tmp_path))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


@pytest.mark.parametrize("before, after", [(":16:8", ":16:8"), (":0:0", ":4096:8"), ("", ":4096:8")])
def test_a_deterministic_workspace_the_user_chose_is_kept_any_other_replaced(monkeypatch, before, after):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", before)
    compose.set_deterministic_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == after


def test_the_entry_point_sets_the_workspace_before_it_starts_workers_or_builds_anything(
    tmp_path, monkeypatch, process_flags
):
    """cuBLAS reads the variable when the process makes its first GPU matmul; workers inherit the environment.
    main() sets it before it launches workers or runs anything (which is where CUDA work can begin)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def run_distributed(cfg, run_fn):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return {}

    monkeypatch.setattr("seqrec.run.run_distributed", run_distributed)
    monkeypatch.setattr("seqrec.run.launch", run_distributed)
    main(compose_config(TINY + ["trainer.deterministic=true"], tmp_path))
    assert seen == [":4096:8"]


def test_an_operation_without_a_deterministic_implementation_is_one_line(tmp_path, monkeypatch, capsys, process_flags):
    def run_distributed(cfg, run_fn):
        torch.use_deterministic_algorithms(True)
        torch.zeros(3).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))  # torch has no deterministic put_

    monkeypatch.setattr("seqrec.run.run_distributed", run_distributed)
    with pytest.raises(SystemExit) as stop:
        main(compose_config(TINY, tmp_path))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.deterministic=true: put_ does not have a determ")
    assert "trainer.deterministic=false" in err[0] and "Traceback" not in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", [["model=tisasrec", "residual=mhc"], ["model=sasrec", "loss=ce"]])
def test_two_deterministic_cuda_runs_are_bitwise_equal(tmp_path, model):
    """The strict mode on a GPU: two fresh processes (the entry point sets the cuBLAS workspace itself), bf16
    autocast as `hardware=1gpu` sets it, the same final weights and metrics bit for bit."""
    runs = []
    for name in ("a", "b"):
        overrides = [*TINY, *model, "hardware=1gpu", "trainer.device=cuda", "trainer.deterministic=true"]
        done = train_cli(*overrides, run_dir=tmp_path / name, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((tmp_path / name / "results.json").read_text())
        weights = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        runs.append(({k: v for k, v in results.items() if "/" in k}, weights))
    (metrics_a, weights_a), (metrics_b, weights_b) = runs
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
