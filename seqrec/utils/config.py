"""Pre-flight config check: every problem in the composed config, reported at once with its config path.

The schema is each `_target_`'s constructor (a `_partial_` node's callable; `distributed` and `slurm` have the
dataclasses of seqrec/settings.py): keys are bound to its signature (unknown or missing keys) and
checked against its int/float/bool/str/list annotations. Value rules (`RULES`, `PLAIN_KEYS`) give every numeric
key its range (tests/test_configs.py checks that none is missing); floats must be finite; a few rules span two
keys (hidden_units divisible by num_heads). Runs before any data is read or any file written. One problem is one
line; several are listed under one. `composition_problem` does the same for what Hydra cannot even compose.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from seqrec.data import synthetic
from seqrec.data.dataset import DUPLICATES
from seqrec.data.readers import FORMATS
from seqrec.errors import ConfigError
from seqrec.settings import SCHEMAS

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# constructor arguments that run.py passes at runtime rather than YAML
RUNTIME_ARGS = {
    "data",
    "model",
    "sampler",
    "evaluator",
    "loss",
    "logger",
    "rank",
    "world_size",
    "run_config",
    "num_items",
    "num_negatives",
    "shared_negatives",
}
RUNTIME_NODES = (
    "dataset",
    "model",
    "residual",
    "loss",
    "sampler",
    "optimizer",
    "schedule",
    "trainer",
    "eval",
    "logger",
)
# arguments a `_partial_` node's callable receives from the Trainer (seqrec/train/trainer.py), per node
PARTIAL_ARGS = {
    "optimizer": {"params"},
    "schedule": {"optimizer", "steps_per_epoch", "num_epochs", "lr_scale"},
    "trainer": {"optimizer", "schedule"},
}


def _one_of(*choices: str) -> tuple:
    return (lambda v: v in choices, "must be one of " + ", ".join(choices))


positive = (lambda v: v > 0, "must be > 0")
non_negative = (lambda v: v >= 0, "must be >= 0")
any_finite = (lambda v: True, "")  # floats without a natural range: only finiteness (checked for every float)
unit_interval = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
seed_range = (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")  # numpy and torch refuse negative seeds

# Value rules by config path, for the keys of `_target_` nodes. Every numeric key of every config option has one
# (tests/test_configs.py checks it); a rule applies only to values that passed the type check, None is skipped.
RULES = {
    "dataset.min_item_interactions": non_negative,
    "dataset.min_user_interactions": non_negative,
    "dataset.format": _one_of(*FORMATS),
    "dataset.duplicates": _one_of(*DUPLICATES),
    **{f"dataset.{name}": rule for name, rule in synthetic.ARGUMENT_RULES.items()},
    "dataset.seed": seed_range,
    "model.maxlen": positive,
    "model.hidden_units": positive,
    "model.num_blocks": positive,
    "model.num_heads": positive,
    "model.dropout_rate": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.time_span": positive,
    "residual.expansion_rate": positive,
    "residual.sinkhorn_iters": positive,
    "residual.init_gate": any_finite,
    "residual.res_diag_init": any_finite,
    "loss.num_negatives": positive,
    "loss.t": unit_interval,
    "loss.chunk_tokens": positive,
    "loss.negatives": _one_of("uniform", "in_batch", "mixed"),
    "sampler.batch_size": positive,
    "sampler.maxlen": positive,
    "sampler.seed": seed_range,
    "sampler.history": _one_of("last", "all"),
    "optimizer.lr": positive,
    "optimizer.betas": (
        lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
        "must be [b1, b2] in [0, 1)",
    ),
    "optimizer.eps": positive,
    "optimizer.weight_decay": non_negative,
    "trainer.num_epochs": positive,
    "trainer.eval_every": positive,
    "trainer.patience": non_negative,
    "trainer.plateau_decays": non_negative,
    "trainer.plateau_factor": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "schedule.warmup_steps": non_negative,
    "schedule.decay_step": positive,
    "schedule.decay_rate": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "trainer.l2_emb": non_negative,
    "trainer.grad_clip": non_negative,
    "trainer.num_workers": non_negative,
    "trainer.log_every_steps": positive,
    "trainer.time_limit_min": non_negative,
    "trainer.checkpoint_every_min": non_negative,
    "trainer.device": (
        lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
        "must be auto, cpu or cuda[:N]",
    ),
    "trainer.amp_dtype": _one_of("bfloat16", "float16"),
    "distributed.backend": _one_of("auto", "nccl", "gloo"),
    "distributed.master_port": (lambda v: 0 <= v <= 65535, "must be a port in [0, 65535]"),
    "distributed.timeout_s": positive,
    "distributed.stall_timeout_s": non_negative,
    "slurm.timeout_min": positive,
    "slurm.max_num_timeout": non_negative,
    "slurm.signal_delay_s": non_negative,
    "slurm.nodes": positive,
    "slurm.tasks_per_node": positive,
    "slurm.gpus_per_node": non_negative,
    "slurm.cpus_per_task": positive,
    "slurm.mem_gb": positive,
    "eval.protocol": _one_of("full", "sampled"),
    "eval.num_negatives": positive,
    "eval.batch_size": positive,
    "eval.maxlen": positive,
    "eval.valid_users": non_negative,
    "eval.item_chunk": positive,
    "eval.seed": seed_range,
    "eval.ks": (
        lambda v: len(v) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in v),
        "must be a non-empty list of positive ints",
    ),
}

# Keys outside any schema: top-level keys, and the `trainer` keys the entry point reads before the Trainer exists
# (seqrec/compose.py ENTRY_POINT_KEYS): path -> (type, rule or None).
PLAIN_KEYS = {
    "seed": (int, seed_range),
    "optimized_metric": (str, None),
    "trainer.devices": (int, positive),
    "trainer.deterministic": (bool, None),
}
# a value that only points at another key (`${sampler.batch_size}`) is checked there, not reported twice
_REFERENCE = re.compile(r"^\$\{[\w.]+\}$")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_problem(path: str, value, annotation, rule) -> str | None:
    """The problem with one value (type, finiteness, then range rule), or None."""
    if not _type_ok(value, annotation):
        return f"{path}={value!r}: expected {_describe(annotation)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}={value!r}: must be a finite number"
    if rule and value is not None and not rule[0](value):
        return f"{path}={value!r}: {rule[1]}"
    return None


PLAIN_TYPES = (bool, int, float, str, list, tuple, type(None))


def _type_ok(value, annotation) -> bool:
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        # `float | Tensor` (torch.optim's lr): a config value can only be the plain alternative
        args = typing.get_args(annotation)
        options = [a for a in args if (typing.get_origin(a) or a) in PLAIN_TYPES] or args
        return any(_type_ok(value, a) for a in options)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    return True


def _describe(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _signature(obj) -> tuple[dict, dict, bool]:
    """Parameters, type hints and whether any keyword is accepted. A class whose __init__ takes **kwargs passes them
    to its base class (TiSASRec -> SASRec), so the base's parameters are followed instead of accepting anything."""
    params = dict(inspect.signature(obj).parameters)
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    var_kw = [name for name, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    base = next((b for b in obj.__mro__[1:] if "__init__" in vars(b)), object) if inspect.isclass(obj) else object
    if var_kw and base is not object:
        base_params, base_hints, takes_any = _signature(base)
        del params[var_kw[0]]
        params.update({k: v for k, v in base_params.items() if k not in params and k != "self"})
        return params, {**base_hints, **hints}, takes_any
    return params, hints, bool(var_kw)


def _check_node(path: str, node: DictConfig, problems: list[str], schema=None) -> None:
    """Bind `node` to its `_target_`'s signature (or to `schema`, a dataclass) and check every value."""
    target = node.get("_target_") if schema is None else f"{schema.__module__}.{schema.__name__}"
    try:
        obj = get_object(target) if schema is None else schema
    except Exception:
        problems.append(f"{path}._target_: cannot import '{target}'")
        return
    runtime = RUNTIME_ARGS | PARTIAL_ARGS.get(path, set())
    params, hints, takes_any = _signature(obj)
    raw = OmegaConf.to_container(node, resolve=False)  # interpolations as written
    for key in node:
        if key in HYDRA_KEYS or f"{path}.{key}" in PLAIN_KEYS:
            continue
        if key not in params and not takes_any:
            accepted = ", ".join(k for k in params if k not in runtime and k != "self")
            problems.append(f"{path}.{key}: unknown key for {target} (accepted: {accepted})")
            continue
        if OmegaConf.is_missing(node, key):
            if key not in runtime:
                problems.append(f"{path}.{key}: required value is missing (???)")
            continue
        if key not in params or OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            continue
        if OmegaConf.is_interpolation(node, key) and _REFERENCE.match(str(raw[key])):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            continue
        value = OmegaConf.to_object(value) if isinstance(value, ListConfig) else value
        problem = _value_problem(
            f"{path}.{key}", value, hints.get(key, params[key].annotation), RULES.get(f"{path}.{key}")
        )
        if problem:
            problems.append(problem)
    for name, p in params.items():
        if (
            p.default is inspect.Parameter.empty
            and p.kind is p.KEYWORD_ONLY
            and name not in node
            and name not in runtime
        ):
            problems.append(f"{path}.{name}: required by {target} but not set")


def check_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every unknown key, wrong type and impossible value in `cfg`."""
    problems: list[str] = []
    for path in RUNTIME_NODES:
        node = cfg.get(path)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            problems.append(f"{path}: missing or has no _target_")
            continue
        try:
            _check_node(path, node, problems)
        except Exception as e:  # an unresolvable interpolation, say
            problems.append(f"{path}: {type(e).__name__}: {e}".splitlines()[0])
    for path, schema in SCHEMAS.items():
        node = cfg.get(path)
        if isinstance(node, DictConfig):  # absent in a composition without a hardware profile
            try:
                _check_node(path, node, problems, schema)
            except Exception as e:
                problems.append(f"{path}: {type(e).__name__}: {e}".splitlines()[0])
    _check_plain_keys(cfg, problems)
    _check_across_keys(cfg, problems)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problems):\n  " + "\n  ".join(problems))


def _check_plain_keys(cfg: DictConfig, problems: list[str]) -> None:
    """Types and ranges of the keys outside `_target_` nodes (seed, distributed.*, slurm.*), where present."""
    for path, (annotation, rule) in PLAIN_KEYS.items():
        parent, _, key = path.rpartition(".")
        node = cfg.get(parent) if parent else cfg
        if not isinstance(node, DictConfig):
            continue  # the whole node (e.g. slurm) is absent in this composition
        if OmegaConf.is_interpolation(node, key) and _REFERENCE.match(str(OmegaConf.to_container(node)[key])):
            continue
        try:
            value = OmegaConf.select(cfg, path, throw_on_missing=True)
        except Exception as e:  # missing (???) or an unresolvable interpolation
            problems.append(f"{path}: {str(e).splitlines()[0]}")
            continue
        problem = _value_problem(path, value, annotation, rule)
        if problem:
            problems.append(problem)


def _check_across_keys(cfg: DictConfig, problems: list[str]) -> None:
    """Rules that involve two keys."""
    model, trainer, evaluation, sampler = (cfg.get(k) for k in ("model", "trainer", "eval", "sampler"))
    if isinstance(model, DictConfig):
        heads, hidden = model.get("num_heads"), model.get("hidden_units")
        if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
            problems.append(f"model.hidden_units={hidden}: must be divisible by model.num_heads={heads}")
    if isinstance(trainer, DictConfig) and isinstance(sampler, DictConfig):
        batch, devices = sampler.get("batch_size"), trainer.get("devices")
        if isinstance(batch, int) and isinstance(devices, int) and 0 < batch < devices:
            problems.append(f"sampler.batch_size={batch}: must be >= trainer.devices={devices} (a row per rank)")
    if isinstance(evaluation, DictConfig):
        ks, negatives = evaluation.get("ks"), evaluation.get("num_negatives")
        sampled = evaluation.get("protocol") == "sampled" or evaluation.get("also_sampled") is True
        if sampled and isinstance(negatives, int) and negatives > 0 and isinstance(ks, ListConfig):
            too_big = [k for k in ks if isinstance(k, int) and k > negatives]
            if too_big:
                problems.append(
                    f"eval.ks={list(ks)}: k={too_big[0]} must be <= eval.num_negatives={negatives} under the sampled "
                    f"protocol (a target among {negatives + 1} candidates is always in the top {negatives + 1})"
                )


def composition_problem(args: list[str], config_dir: str) -> str | None:
    """One line for a command line that Hydra cannot compose (an unknown option or key, bad override syntax), or
    None. Hydra's own report of these spans several lines (search path, object type); this one names the override
    and what was expected. Command lines with flags (--multirun, --cfg, ...) are left to Hydra."""
    if any(arg.startswith("-") for arg in args):
        return None
    try:
        _compose(args, config_dir)
    except MissingConfigException as e:
        group = (e.missing_cfg_file or "").split("/")[0]
        chosen = next((a for a in args if a.lstrip("+~").split("=")[0] == group), group)
        return f"{chosen}: no such option" + (f" (available: {', '.join(e.options)})" if e.options else "")
    except OverrideParseException as e:
        bad = next((a for a in args if not _parses(a)), " ".join(args))
        return f"{bad}: cannot parse this override ({str(e).splitlines()[0]}), expected key=value"
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ or e
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            return f"{key}: no such key in the config{_closest_keys(key, args, config_dir)}"
        return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # its hints, on one line
    return None


def _parses(arg: str) -> bool:
    try:
        OverridesParser.create().parse_override(arg)
        return True
    except HydraException:  # OverrideParseException, or HydraException for some syntax errors
        return False


def _compose(args: list[str], config_dir: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="train", overrides=args)


def _closest_keys(key: str, args: list[str], config_dir: str) -> str:
    """ " (did you mean optimizer.lr?)" from the keys next to `key` in the config composed without it, or ""."""
    parent, _, name = key.rpartition(".")
    try:
        cfg = _compose([a for a in args if a.split("=")[0] != key], config_dir)
    except Exception:  # another override is broken too: no suggestion
        return ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(name, [str(k) for k in node.keys()], n=2)
    if not close:
        value = next((a.split("=", 1)[1] for a in args if a.split("=")[0] == key), "...")
        return f" (see `python train.py --cfg job`; to add a key the config does not list: +{key}={value})"
    return " (did you mean " + " or ".join(f"{parent}.{k}" if parent else k for k in close) + "?)"
