"""Real multi-process DDP on the CPU (gloo): the built-in launcher, external torchrun, sharded evaluation.

Every test starts real processes; nothing is mocked. Tiny config so each stays well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY as SHARED_TINY
from tests.conftest import train_cli

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = [*SHARED_TINY, "hardware=cpu", "trainer.device=cpu", "model.maxlen=20"]


def _train(args: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = 90):
    proc = train_cli(*TINY, *args, cwd=cwd, timeout=timeout, launcher=launcher)
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_builtin_launcher_two_gloo_workers_match_one_process(tmp_path):
    """`trainer.devices=2` starts 2 workers itself: one run dir, identical replicas, metrics of the 1-process run."""
    _train(["trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path)
    _train(["trainer.devices=1", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]  # no per-rank folders
    for d in (ddp, one):
        assert (d / "checkpoints" / "last.pt").is_file() and (d / "checkpoints" / "best.pt").is_file()
        assert (d / "run.json").is_file()
    log = (ddp / "train.log").read_text()
    assert "starting 2 gloo workers" in log
    assert "parameters identical on all 2 ranks" in log  # checked by the trainer at the end of fit
    assert log.count("][seqrec.compose][INFO] - model: ") == 1  # rank 0 alone logs at INFO
    r_ddp, r_one = (json.loads((d / "results.json").read_text()) for d in (ddp, one))
    assert r_ddp["epochs_run"] == r_one["epochs_run"] == 2
    assert r_ddp["steps"] == r_one["steps"]  # same global batches
    for key in ("val/ndcg@10", "val/hr@10", "test/ndcg@10", "test/hr@10"):
        assert abs(r_ddp[key] - r_one[key]) <= 0.03, (key, r_ddp[key], r_one[key])
    assert [m["epoch"] for m in _metrics(ddp)] == [1, 2]  # one writer: no duplicated lines
    loss_ddp, loss_one = _metrics(ddp)[-1]["train/loss"], _metrics(one)[-1]["train/loss"]
    assert abs(loss_ddp - loss_one) / loss_one < 0.1


@pytest.mark.slow
def test_external_torchrun_shares_one_run_dir(tmp_path):
    """`torchrun --standalone --nproc_per_node=2 train.py` works and both ranks agree on one timestamped run dir."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _train([], tmp_path, launcher=torchrun)
    runs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # Hydra's ${now:} would give each rank its own folder
    run = runs[0]
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_run"] == 2 and "test/ndcg@10" in results
    log = (run / "train.log").read_text()
    assert "rank 0/2 joined the gloo process group" in log
    assert "parameters identical on all 2 ranks" in log


@pytest.mark.slow
def test_sparse_item_gradients_are_all_reduced_by_gloo(tmp_path):
    """optimizer=lazy_adam under 2 gloo workers: DDP all-reduces the table's sparse gradient, the replicas stay
    identical and the run follows the 1-process one."""
    lazy = ["optimizer=lazy_adam", "loss=sampled_softmax", "loss.num_negatives=16", "model=sasrec"]
    _train([*lazy, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path)
    _train([*lazy, "trainer.devices=1", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert "parameters identical on all 2 ranks" in (tmp_path / "ddp" / "train.log").read_text()
    r_ddp, r_one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ddp", "one"))
    assert r_ddp["steps"] == r_one["steps"]
    for key in ("val/ndcg@10", "test/ndcg@10"):
        assert abs(r_ddp[key] - r_one[key]) <= 0.03, (key, r_ddp[key], r_one[key])
    loss_ddp, loss_one = _metrics(tmp_path / "ddp")[-1]["train/loss"], _metrics(tmp_path / "one")[-1]["train/loss"]
    assert abs(loss_ddp - loss_one) / loss_one < 0.1


@pytest.mark.slow
def test_launch_failure_is_one_clear_error(tmp_path):
    """A user error inside the workers ends the whole launch with one `error:` line and status 1."""
    proc = train_cli(*TINY, "trainer.devices=2", "trainer.resume=/nonexistent/last.pt", run_dir=tmp_path / "run")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: DDP worker rank" in proc.stderr and "checkpoint not found" in proc.stderr


# --- sharded evaluation ----------------------------------------------------------------------------

EVAL_OVERRIDES = [
    "dataset.num_users=300",
    "model.maxlen=20",
    "hardware=cpu",
    "eval.also_sampled=true",
    "eval.batch_size=64",
]


def _eval_objects(rank: int, world_size: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import seqrec.launch  # noqa: F401  (config resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=EVAL_OVERRIDES)
    data = instantiate(cfg.dataset)
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_items=data.num_items).eval()
    # partial: hydra would turn the SeqData dataclass passed as a kwarg into a DictConfig
    evaluator = instantiate(cfg.eval, _partial_=True)(data=data, rank=rank, world_size=world_size)
    return model, evaluator


def _eval_worker() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        model, evaluator = _eval_objects(dist.get_rank(), dist.get_world_size())
        metrics = {split: evaluator.evaluate(model, split) for split in ("valid", "test")}
        return {**metrics, "test_ranks": [a.tolist() for a in evaluator.test_ranks]}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process():
    """Users sharded over 2 gloo ranks + all-reduced sums == one process, metric by metric; every rank gathers the
    per-user test ranks of one process."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from seqrec.train.distributed import free_port

    model, evaluator = _eval_objects(0, 1)
    single = {split: evaluator.evaluate(model, split) for split in ("valid", "test")}
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id="eval-test",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        start_method="spawn",
    )
    sharded = elastic_launch(config, _eval_worker)()
    assert sharded[0] == sharded[1]  # every rank gets the reduced metrics
    assert sharded[0]["test_ranks"] == [a.tolist() for a in evaluator.test_ranks]
    for split in ("valid", "test"):
        assert set(sharded[0][split]) == set(single[split])
        assert any(v > 0 for v in single[split].values())
        for key, value in single[split].items():
            assert sharded[0][split][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.slow
def test_doctor_reports_and_runs_the_gloo_smoke_test():
    proc = subprocess.run([sys.executable, "-m", "seqrec.doctor"], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    for field in ("cuda", "bf16", "cpu bf16 kernels", "nccl", "gloo", "rendezvous port", "slurm", "mHC C++ kernels"):
        assert f"\n{field} " in out or out.startswith(field), field
    assert "gloo smoke test        ok: 2-rank all_reduce -> [3.0, 3.0]" in out
    assert out.rstrip().endswith("doctor: all checks passed")
