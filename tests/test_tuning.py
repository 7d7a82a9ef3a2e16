"""The four tuning stages (conf/tuning/stage*.yaml): they compose, sweep existing keys with the SPEC's values, name
their sweep and job folders readably, and carry each stage's winner forward in the files themselves."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seqrec.utils.config import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"

EXPECTED = {
    "stage1": {"seed": ["42"]},
    "stage2": {"model.hidden_units": ["50", "128", "256"], "model.num_blocks": ["2", "3"]},
    "stage3": {"optimizer.lr": ["0.0005", "0.001", "0.002"]},
    "stage4": {"model.dropout_rate": ["0.2", "0.3", "0.4"]},
}


def compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sweep_params(cfg) -> dict[str, list[str]]:
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_composes_as_a_multirun_over_existing_keys(stage):
    cfg = compose_hydra([f"tuning={stage}"])
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    params = sweep_params(cfg)
    assert params == EXPECTED[stage]
    for key in params:
        assert OmegaConf.select(cfg, key, default=None) is not None, f"{stage} sweeps {key}, which is not a config key"
    assert cfg.sweep_name.startswith(f"{stage}_")
    assert cfg.hydra.sweep.dir == f"outputs/sweeps/{cfg.sweep_name}"


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_every_job_of_a_stage_passes_the_config_check(stage, tmp_path):
    # no Hydra runtime in compose: explicit output dirs, and hardware=cpu (no runtime resolvers)
    outputs = [f"trainer.output_dir={tmp_path}", f"logger.output_dir={tmp_path}", "hardware=cpu"]
    params = sweep_params(compose_hydra([f"tuning={stage}"]))
    for values in itertools.product(*params.values()):
        job = [f"{k}={v}" for k, v in zip(params, values, strict=False)]
        cfg = compose_hydra([f"tuning={stage}", *job, *outputs])
        assert cfg.model.hidden_units % cfg.model.num_heads == 0
        check_config(cfg)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_file_opens_with_its_command_and_says_how_the_winner_is_carried(stage):
    text = (CONF / "tuning" / f"{stage}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    head = "\n".join(text.splitlines()[:12])
    assert f"python train.py -m tuning={stage}" in head
    assert "Carried forward" in text or "carry forward" in text or "Next:" in text
    assert "python -m seqrec.compare" in text


def test_winners_are_carried_forward_consistently():
    stage3, stage4 = compose_hydra(["tuning=stage3"]), compose_hydra(["tuning=stage4"])
    for key in ("hidden_units", "num_blocks"):  # stage 2's winner, written into both files
        assert stage3.model[key] == stage4.model[key]
    assert stage4.optimizer.lr in (0.0005, 0.001, 0.002)  # stage 3's winner is one of its candidates


def test_job_folders_are_named_by_the_swept_overrides_only():
    cfg = compose_hydra(
        [
            "tuning=stage2",
            "model.hidden_units=128",
            "model.num_blocks=3",
            "logger=wandb",
            "trainer.progress=false",
            "sweep_name=x",
        ]
    )
    assert cfg.hydra.job.override_dirname == "model.hidden_units=128,model.num_blocks=3"
    assert cfg.hydra.sweep.subdir == cfg.hydra.job.override_dirname


def test_optuna_sweeper_config_composes_when_the_plugin_is_installed():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_hydra(["tuning=optuna"])
    assert cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, default=None) is not None


def test_every_setting_named_in_the_tuning_guide_exists(tmp_path):
    """docs/TUNING.md's commands and symptom -> fix table name real config keys (with the options that mount them)."""
    import re

    text = (CONF.parent / "docs" / "TUNING.md").read_text()
    keys = set(re.findall(r"\b((?:model|trainer|residual|logger|eval|dataset)\.[a-z_]+)=", text))
    assert len(keys) > 15
    trees = [
        OmegaConf.to_container(compose_hydra(opts), resolve=False)
        for opts in (["model=tisasrec", "residual=mhc", "logger=wandb"], ["dataset=file"])
    ]

    def exists(tree: dict, key: str) -> bool:
        for part in key.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    missing = [k for k in sorted(keys) if not any(exists(t, k) for t in trees)]
    assert not missing, f"docs/TUNING.md names settings that do not exist: {missing}"
    for stage in EXPECTED:
        assert f"python train.py -m tuning={stage}" in text
