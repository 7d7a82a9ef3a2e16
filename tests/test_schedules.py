"""The optimizer and schedule config groups reproduce the Trainer's former hard-coded Adam and lr formula exactly."""

import math

import pytest
import torch
from hydra.utils import instantiate

from seqrec.errors import CheckpointError
from seqrec.run import run
from seqrec.train.checkpoint import load_checkpoint, save_checkpoint
from seqrec.train.early_stopping import EarlyStopping
from seqrec.train.resume_policy import config_differences, schedule_moved, upgrade_layout
from tests.conftest import TINY, compose_config


def former_lr_factor(step, *, steps_per_epoch, num_epochs, warmup_steps, decay_step, decay_rate, cosine, plateau):
    """The formula the Trainer used before the schedule became a config group (written out again, on purpose)."""
    factor_plateau, decays = plateau
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    factor = warm * decay_rate ** (epoch // decay_step) * factor_plateau**decays
    if cosine:
        progress = min(1.0, step / max(num_epochs * steps_per_epoch, 1))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("decays", [0, 2])
def test_the_lr_of_every_step_equals_the_former_formula(schedule, decays):
    shape = ["schedule.warmup_steps=7", "schedule.decay_step=2", "schedule.decay_rate=0.9", "optimizer.lr=0.003"]
    cfg = compose_config([f"schedule={schedule}"] + shape)
    stopping = EarlyStopping("val/ndcg@10", patience=1, plateau_decays=decays, plateau_factor=0.1)
    stopping.lr_decays = decays
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    scheduler = instantiate(cfg.schedule)(optimizer, steps_per_epoch=5, num_epochs=6, lr_scale=stopping.lr_scale)
    seen = []
    for _ in range(40):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        0.003 * former_lr_factor(step, steps_per_epoch=5, num_epochs=6, warmup_steps=7, decay_step=2, decay_rate=0.9,
                                 cosine=schedule == "cosine", plateau=(0.1, decays))
        for step in range(40)
    ]  # fmt: skip
    assert seen == expected  # exactly: same operations in the same order


def test_adam_from_the_config_makes_the_same_updates_as_the_former_hard_coded_adam():
    torch.manual_seed(0)
    start, grads = torch.randn(5), [torch.randn(5) for _ in range(4)]
    cfg = compose_config(["optimizer.lr=0.002"])
    weights = {name: torch.nn.Parameter(start.clone()) for name in ("config", "former")}
    optimizers = {
        "config": instantiate(cfg.optimizer)([weights["config"]]),
        "former": torch.optim.Adam([weights["former"]], lr=0.002, betas=(0.9, 0.98)),
    }
    for grad in grads:
        for name, optimizer in optimizers.items():
            weights[name].grad = grad.clone()
            optimizer.step()
    assert torch.equal(weights["config"], weights["former"])


FORMER = {
    "seed": 1,
    "trainer": {"lr": 0.001, "betas": [0.9, 0.98], "warmup_steps": 100, "lr_decay_step": 1000, "lr_decay_rate": 0.95,
                "lr_schedule": "constant", "batch_size": 128, "num_epochs": 4, "patience": 10},
    "sampler": {"batch_size": 128},
}  # fmt: skip
CURRENT = {
    "seed": 1,
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "_convert_": "all", "lr": 0.001,
                  "betas": [0.9, 0.98], "eps": 1e-08, "weight_decay": 0.0},
    "schedule": {"_target_": "seqrec.train.schedules.constant", "_partial_": True, "warmup_steps": 100,
                 "decay_step": 1000, "decay_rate": 0.95},
    "trainer": {"num_epochs": 4, "patience": 10},
    "sampler": {"batch_size": 128},
}  # fmt: skip


def test_a_run_recorded_with_trainer_lr_resumes_under_the_same_settings_spelled_the_new_way():
    assert upgrade_layout(FORMER) == CURRENT
    assert config_differences(FORMER, CURRENT) == []


def test_a_run_recorded_with_trainer_lr_is_refused_a_real_change_under_the_new_key_names():
    changed = {**CURRENT, "optimizer": {**CURRENT["optimizer"], "lr": 0.002}}
    assert config_differences(FORMER, changed) == ["optimizer.lr: 0.001 -> 0.002"]
    cosine = {**CURRENT, "schedule": {**CURRENT["schedule"], "_target_": "seqrec.train.schedules.cosine"}}
    assert config_differences(FORMER, cosine) == [
        "schedule._target_: 'seqrec.train.schedules.constant' -> 'seqrec.train.schedules.cosine'"
    ]
    assert "schedule=constant over 4 epochs, now schedule=cosine over 4" in schedule_moved(FORMER, cosine)


def _as_recorded_before_the_rename(config: dict) -> dict:
    """The config a run made before `optimizer=`/`schedule=` existed would have saved for the same settings."""
    optimizer, schedule = config.pop("optimizer"), config.pop("schedule")
    config["trainer"] |= {
        "lr": optimizer["lr"],
        "betas": optimizer["betas"],
        "warmup_steps": schedule["warmup_steps"],
        "lr_decay_step": schedule["decay_step"],
        "lr_decay_rate": schedule["decay_rate"],
        "lr_schedule": schedule["_target_"].rsplit(".", 1)[-1],
        "batch_size": config["sampler"]["batch_size"],
    }
    return config


def test_a_checkpoint_saved_with_trainer_lr_resumes_and_refuses_a_new_lr(tmp_path):
    run(compose_config(TINY + ["trainer.num_epochs=1"], tmp_path))
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"] = _as_recorded_before_the_rename(state["config"])
    save_checkpoint(state, last)
    with pytest.raises(CheckpointError, match=r"optimizer.lr: 0.001 -> 0.002"):
        run(compose_config(TINY + ["trainer.num_epochs=2", "optimizer.lr=0.002"], tmp_path))
    results = run(compose_config(TINY + ["trainer.num_epochs=2"], tmp_path))
    assert results["epochs_run"] == 2 and results["steps"] == 2 * state["step"]
