"""Pre-flight config check: every problem in the composed config, reported at once with its config path.

The schema is each `_target_`'s constructor: keys are bound to its signature (unknown or missing keys) and
checked against its int/float/bool/str/list annotations; a few value rules cover what types cannot say
(e.g. hidden_units divisible by num_heads). Runs before any data is read or any file written.
"""

from __future__ import annotations

import inspect
import typing

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from seqrec.errors import ConfigError

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
RUNTIME_NODES = ("dataset", "model", "residual", "loss", "sampler", "trainer", "eval", "logger")

positive = (lambda v: v > 0, "must be > 0")
non_negative = (lambda v: v >= 0, "must be >= 0")
RULES = {
    "model.maxlen": positive,
    "model.hidden_units": positive,
    "model.num_blocks": positive,
    "model.num_heads": positive,
    "model.dropout_rate": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "trainer.lr": positive,
    "trainer.batch_size": positive,
    "trainer.num_epochs": positive,
    "trainer.eval_every": positive,
    "trainer.patience": non_negative,
    "trainer.plateau_decays": non_negative,
    "trainer.plateau_factor": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "trainer.warmup_steps": non_negative,
    "trainer.lr_decay_step": positive,
    "trainer.lr_decay_rate": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "trainer.lr_schedule": (lambda v: v in ("constant", "cosine"), "must be constant or cosine"),
    "trainer.l2_emb": non_negative,
    "trainer.grad_clip": non_negative,
    "trainer.devices": positive,
    "trainer.num_workers": non_negative,
    "trainer.device": (
        lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
        "must be auto, cpu or cuda[:N]",
    ),
    "trainer.amp_dtype": (lambda v: v in ("bfloat16", "float16"), "must be bfloat16 or float16"),
    "eval.protocol": (lambda v: v in ("full", "sampled"), "must be full or sampled"),
    "sampler.history": (lambda v: v in ("last", "all"), "must be last or all"),
    "eval.num_negatives": positive,
    "eval.batch_size": positive,
    "eval.ks": (
        lambda v: len(v) > 0 and all(isinstance(k, int) and k > 0 for k in v),
        "must be a list of positive ints",
    ),
    "loss.num_negatives": positive,
}


def _type_ok(value, annotation) -> bool:
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
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


def _check_node(path: str, node: DictConfig, problems: list[str]) -> None:
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception:
        problems.append(f"{path}._target_: cannot import '{target}'")
        return
    params, hints, takes_any = _signature(obj)
    for key in node:
        if key in HYDRA_KEYS:
            continue
        if key not in params and not takes_any:
            accepted = ", ".join(k for k in params if k not in RUNTIME_ARGS and k != "self")
            problems.append(f"{path}.{key}: unknown key for {target} (accepted: {accepted})")
            continue
        if OmegaConf.is_missing(node, key):
            if key not in RUNTIME_ARGS:
                problems.append(f"{path}.{key}: required value is missing (???)")
            continue
        if key not in params or OmegaConf.is_interpolation(node, key) and isinstance(node[key], DictConfig):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            continue
        value = OmegaConf.to_object(value) if isinstance(value, ListConfig) else value
        annotation = hints.get(key, params[key].annotation)
        if not _type_ok(value, annotation):
            problems.append(f"{path}.{key}={value!r}: expected {_describe(annotation)}")
            continue
        rule = RULES.get(f"{path}.{key}")
        if rule and not rule[0](value):
            problems.append(f"{path}.{key}={value!r}: {rule[1]}")
    for name, p in params.items():
        if (
            p.default is inspect.Parameter.empty
            and p.kind is p.KEYWORD_ONLY
            and name not in node
            and name not in RUNTIME_ARGS
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
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        heads, hidden = model.get("num_heads"), model.get("hidden_units")
        if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
            problems.append(f"model.hidden_units={hidden}: must be divisible by model.num_heads={heads}")
    if problems:
        raise ConfigError(
            f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  " + "\n  ".join(problems)
        )
