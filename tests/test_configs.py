"""Every config group combination composes, passes the pre-flight check and builds its objects; bad values
are all reported at once with their config paths."""

import itertools
import subprocess

import pytest
import torch
from hydra.utils import instantiate

from seqrec.data.dataset import synthetic
from seqrec.errors import ConfigError
from seqrec.utils.config import check_config
from tests.conftest import CONF, REPO, TINY, compose_config, train_cli


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


DATA = synthetic(num_users=50, num_items=40, seed=0)


@pytest.mark.parametrize(
    "model,residual,loss",
    list(itertools.product(options("model"), options("residual"), options("loss"))),
)
def test_model_residual_loss_combinations_compose_check_and_build(model, residual, loss, tmp_path):
    cfg = compose_config(TINY + [f"model={model}", f"residual={residual}", f"loss={loss}"], tmp_path)
    check_config(cfg)
    built = instantiate(cfg.model, num_items=DATA.num_items)
    assert type(built).__name__.lower() == model.replace("_", "")
    instantiate(cfg.loss)


@pytest.mark.parametrize("hardware", options("hardware"))
@pytest.mark.parametrize("dataset", options("dataset"))
def test_hardware_and_dataset_options_compose_and_check(hardware, dataset, tmp_path):
    extra = ["dataset.path=x.txt"] if dataset == "file" else []
    cfg = compose_config([f"hardware={hardware}", f"dataset={dataset}"] + extra, tmp_path)
    check_config(cfg)


def test_all_bad_values_are_reported_together_with_their_paths(tmp_path):
    cfg = compose_config(
        [
            "optimizer.lr=-0.1",
            "model.maxlen=0",
            "model.num_heads=3",
            "+model.dmodel=64",
            "trainer.patience=abc",
            "trainer.plateau_factor=1",
            "sampler.history=every",
            "schedule.decay_rate=2",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert "8 problems" in msg
    for needle in (
        "optimizer.lr=-0.1: must be > 0",
        "model.maxlen=0: must be > 0",
        "model.hidden_units=50: must be divisible by model.num_heads=3",
        "model.dmodel: unknown key for seqrec.models.tisasrec.TiSASRec",
        "trainer.patience='abc': expected int",
        "trainer.plateau_factor=1: must be in (0, 1)",
        "sampler.history='every': must be one of last, all",
        "schedule.decay_rate=2: must be in (0, 1]",
    ):
        assert needle in msg


def test_missing_required_value_is_reported(tmp_path):
    cfg = compose_config(["dataset=file"], tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.path: required value is missing"):
        check_config(cfg)


def run_cli(*overrides: str, cwd=REPO) -> subprocess.CompletedProcess:
    return train_cli(*overrides, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.num_heads=3"], "must be divisible by model.num_heads=3"),
        (["optimizer.lr=-1"], "optimizer.lr=-1: must be > 0"),
        (["model=transformerxl"], "model=transformerxl: no such option (available: sasrec, tisasrec)"),
        (["model.not_a_key=1"], "model.not_a_key: no such key in the config"),
        (["dataset=file", "dataset.path=/nonexistent/ratings.txt"], "/nonexistent/ratings.txt"),
    ],
)
def test_cli_reports_user_errors_without_a_traceback(overrides, needle, tmp_path):
    proc = run_cli(*overrides, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [proc.stderr.splitlines()[0]]


def _numeric_leaves(node, path=""):
    for key, value in node.items():
        full = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict):
            yield from _numeric_leaves(value, full)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield full


def _is_numeric_default(parameter) -> bool:
    return isinstance(parameter.default, (int, float)) and not isinstance(parameter.default, bool)


def _constructors(cfg):
    """(config path, constructor) for every `_target_` node and every schema node of `cfg`."""
    from hydra.utils import get_object

    from seqrec.settings import SCHEMAS
    from seqrec.utils.config import target_nodes

    yield from ((path, get_object(node._target_)) for path, node in target_nodes(cfg))
    yield from ((path, schema) for path, schema in SCHEMAS.items() if path in cfg)


def test_every_numeric_key_of_every_option_has_a_range_rule(tmp_path):
    """Every numeric key of every config option, and every numeric argument a constructor takes from the config
    (`+dataset.p_habit=...` reaches those), has a rule beside its constructor or in the checker's own tables; a
    rule names an argument its constructor takes."""
    from omegaconf import OmegaConf

    from seqrec.utils.config import PLAIN_KEYS, constructor_rules, runtime_args, signature_of

    unruled, misnamed = set(), set()
    for group in ("model", "residual", "loss", "hardware", "dataset", "optimizer", "schedule", "logger"):
        for option in options(group):
            extra = ["dataset.path=x.txt"] if option == "file" else []
            cfg = compose_config([f"{group}={option}"] + extra, tmp_path)
            ruled = {path for path, (_, rule) in PLAIN_KEYS.items() if rule is not None}
            for path, constructor in _constructors(cfg):
                rules, params = constructor_rules(constructor), signature_of(constructor)[0]
                ruled |= {f"{path}.{key}" for key in rules}
                misnamed |= {f"{path}.{key}" for key in rules if key not in params}
                arguments = [k for k, p in params.items() if _is_numeric_default(p) and k not in runtime_args(path)]
                unruled |= {f"{path}.{key}" for key in arguments if key not in rules}
            container = OmegaConf.to_container(cfg, resolve=False)
            container.pop("hydra", None)
            unruled |= {key for key in _numeric_leaves(container) if key not in ruled}
    assert not unruled and not misnamed, (sorted(unruled), sorted(misnamed))


def test_rules_declared_beside_their_constructors_are_applied_with_the_closest_names_for_an_unknown_key(tmp_path):
    cfg = compose_config(
        ["model.time_unit=week", "residual.readout=max", "kernels=fast", "+model.hiden_units=8", "loss=gbce"]
        + ["loss.t=2", "+distributed.bakend=gloo"],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config (6 problems):", lines
    for needle in (
        "model.time_unit='week': must be one of second, minute, hour, day, personal",  # TiSASRec.RULES
        "residual.readout='max': must be one of sum, mean",  # MHC.RULES
        "loss.t=2: must be in [0, 1]",  # GBCE.RULES
        "kernels='fast': must be one of auto, reference",  # a top-level key: the checker's own table
        "model.hiden_units: unknown key for seqrec.models.tisasrec.TiSASRec (accepted: time_unit, time_span, maxlen, ",
        "; did you mean model.hidden_units or model.time_unit?)",
        "distributed.bakend: unknown key for seqrec.settings.DistributedSettings (accepted: backend, master_port, "
        "timeout_s, stall_timeout_s; did you mean distributed.backend?)",
    ):
        assert sum(needle in line for line in lines[1:]) == 1, needle


def test_distributed_and_slurm_keys_are_bound_to_their_schemas(tmp_path):
    cfg = compose_config(
        ["+distributed.bakend=gloo", "slurm.nodes=0", "+slurm.gpus=1", "distributed.timeout_s=x"], tmp_path
    )
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    msg = str(err.value)
    assert "4 problems" in msg, msg
    for needle in (
        "distributed.bakend: unknown key for seqrec.settings.DistributedSettings (accepted: backend, master_port",
        "slurm.gpus: unknown key for seqrec.settings.SlurmSettings",
        "slurm.nodes=0: must be > 0",
        "distributed.timeout_s='x': expected int",
    ):
        assert needle in msg, needle


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("schedule", options("schedule"))
def test_optimizer_and_schedule_options_check_and_build_as_partials(optimizer, schedule, tmp_path):
    cfg = compose_config(TINY + [f"optimizer={optimizer}", f"schedule={schedule}"], tmp_path)
    check_config(cfg)
    weights = torch.nn.Parameter(torch.zeros(3))
    built = instantiate(cfg.optimizer)([weights])
    assert type(built).__name__.lower() == optimizer.replace("_", "")  # lazy_adam -> LazyAdam
    assert built.param_groups[0]["lr"] == cfg.optimizer.lr
    scheduler = instantiate(cfg.schedule)(built, steps_per_epoch=4, num_epochs=2)
    assert scheduler.get_last_lr()[0] == cfg.optimizer.lr  # TINY turns warm-up off: step 0 has the full lr


def test_tisasrec_inherits_every_sasrec_key():
    sasrec, tisasrec = compose_config(["model=sasrec"]).model, compose_config(["model=tisasrec"]).model
    assert set(tisasrec) - set(sasrec) == {"time_unit", "time_span"}
    assert all(tisasrec[k] == sasrec[k] for k in sasrec if k not in ("_target_", "residual", "num_items"))
