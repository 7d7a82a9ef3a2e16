"""Mixed precision and hardware profiles: a bf16 autocast step on the CPU, and what each profile sets."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
from conftest import CONF, TINY, compose_config
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import seqrec.launch  # noqa: F401  (registers ${seqrec.amp_dtype:} and friends)
from seqrec.compose import ENTRY_POINT_KEYS
from seqrec.train.distributed import best_amp_dtype

# the SLURM launcher configs come from hydra-submitit-launcher (in the dev extras); without it they cannot compose
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher not installed (pip install -e '.[dev]')",
)


def _trainer(cfg, tmp_path, **trainer_kw):
    data = instantiate(cfg.dataset)
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_items=data.num_items)
    loss = instantiate(cfg.loss)
    sampler = instantiate(cfg.sampler, _partial_=True)(
        data=data, num_negatives=loss.num_negatives, shared_negatives=loss.shared_negatives
    )
    evaluator = instantiate(cfg.eval, _partial_=True)(data=data)
    logger = instantiate(cfg.logger, output_dir=str(tmp_path))
    skip = {"_target_", *ENTRY_POINT_KEYS}
    kw = {k: v for k, v in cfg.trainer.items() if k not in skip} | {"output_dir": str(tmp_path)} | trainer_kw
    from seqrec.train.trainer import Trainer

    parts = instantiate(cfg.optimizer), instantiate(cfg.schedule)
    return Trainer(model, sampler, evaluator, loss, logger, *parts, **kw)


def test_bf16_autocast_step_on_cpu_is_finite(tmp_path):
    cfg = compose_config(TINY + ["hardware=cpu"], tmp_path)
    trainer = _trainer(cfg, tmp_path, amp=True, amp_dtype="bfloat16", device="cpu")
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()  # no GradScaler for bf16
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    for batch in itertools.islice(trainer.sampler.epoch(0), 3):
        loss = trainer.train_step(batch)
        assert torch.isfinite(loss), loss
    after = list(trainer.raw_model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(p.dtype == torch.float32 for p in after)  # autocast keeps fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_hardware_profiles_set_precision_ddp_and_slurm_resources():
    v100 = compose_config(["hardware=4xv100"])
    t = v100.trainer
    assert (t.devices, t.amp, t.amp_dtype, t.device) == (4, True, "float16", "cuda")
    assert v100.distributed.backend == "nccl"
    assert (v100.slurm.gpus_per_node, v100.slurm.tasks_per_node) == (4, 4)  # one task per GPU
    assert v100.slurm.max_num_timeout > 0  # requeue is safe: trainer.resume=auto
    one = compose_config(["hardware=1gpu"])
    assert one.trainer.amp and one.trainer.amp_dtype == best_amp_dtype()  # bf16 where supported, else fp16
    assert (one.trainer.devices, one.slurm.gpus_per_node) == (1, 1)
    cpu = compose_config(["hardware=cpu", "trainer.devices=2"])
    assert (cpu.trainer.amp, cpu.distributed.backend, cpu.slurm.tasks_per_node) == (False, "gloo", 2)
    auto = compose_config(["hardware=auto"])
    assert auto.trainer.amp == torch.cuda.is_available()


@needs_submitit
@pytest.mark.parametrize("hardware", ["cpu", "1gpu", "4xv100", "auto"])
def test_slurm_launcher_takes_resources_from_the_profile(hardware):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hardware={hardware}", "hydra/launcher=slurm", "slurm.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == cfg.slurm.tasks_per_node
    assert launcher.gpus_per_node == cfg.slurm.gpus_per_node and launcher.mem_gb == cfg.slurm.mem_gb
    assert launcher.max_num_timeout > 0


def test_4xv100_keeps_the_single_gpu_recipe():
    """Four GPUs make the same updates as one: the profile moves the maths, it does not change it."""
    one, four = compose_config(["hardware=1gpu"]), compose_config(["hardware=4xv100"])
    assert four.trainer.num_epochs == one.trainer.num_epochs
    assert four.optimizer == one.optimizer and four.schedule == one.schedule
    assert four.sampler.batch_size == one.sampler.batch_size  # the global batch, split over the ranks


def test_every_profile_inherits_one_base_and_sets_the_same_keys():
    keys = None
    for hardware in ("base", "cpu", "auto", "1gpu", "4xv100"):
        cfg = compose_config([f"hardware={hardware}"])
        these = {f"{node}.{k}" for node in ("trainer", "distributed", "slurm") for k in cfg[node]}
        assert keys is None or these == keys, hardware
        keys = these


def test_4xv100_multiruns_stay_local_unless_slurm_is_asked_for():
    """The headline profile composes on a base install: only `hydra/launcher=slurm` needs the slurm extra."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        v100 = compose(config_name="train", overrides=["hardware=4xv100"], return_hydra_config=True)
    assert v100.hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_the_headline_command_on_a_cpu_only_machine_is_one_line_and_leaves_no_run(tmp_path):
    """`hardware=4xv100` here used to start four workers that each died with 'NCCL not built in' after loading
    the data; the pre-flight check answers before any data is read or any worker started."""
    from conftest import train_cli

    run_dir = tmp_path / "run"
    done = train_cli("model=tisasrec", "residual=mhc", "hardware=4xv100", run_dir=run_dir, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: trainer.device=cuda"), done.stderr
    assert "hardware=cpu" in done.stderr and "Traceback" not in done.stdout + done.stderr
    assert not run_dir.exists()  # a refused first launch leaves nothing behind
