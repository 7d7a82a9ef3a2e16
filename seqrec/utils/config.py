"""Pre-flight config check: every problem in the composed config, reported at once with its config path.

Every node with a `_target_` (a `_partial_` node's callable too) is bound to its constructor's signature: a key
the constructor does not take (one line, with the closest names), a required argument that is not set, a value
that does not fit the int/float/bool/str/list annotation. The value rules live beside each constructor (its
`RULES`, seqrec/utils/rules.py) and are applied here; floats must be finite. `distributed` and `slurm` are bound the
same way to the dataclasses of seqrec/settings.py. Only what no constructor of ours reads has its rule in this file:
the top-level keys and the `trainer` keys the entry point reads (`PLAIN_KEYS`), torch's optimizers
(`FOREIGN_RULES`) and the few rules that span two keys (hidden_units divisible by num_heads). Every numeric key
has a rule (tests/test_configs.py checks it). Runs before any data is read or any file written. One problem is
one line; several are listed under one. `composition_problem` does the same for what Hydra cannot even compose.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from seqrec import kernels
from seqrec.errors import ConfigError
from seqrec.settings import SCHEMAS
from seqrec.train.distributed import resolve_backend
from seqrec.utils.rules import ADAM_RULES, POSITIVE, SEED, Rule, is_number, one_of, rules_of, violation

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
# the nodes seqrec/compose.py builds: each must be there, with a `_target_`
REQUIRED_NODES = (
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


# The rules of constructors we do not own, by module: every torch.optim optimizer names its arguments alike.
FOREIGN_RULES = {"torch.optim": ADAM_RULES}

# Keys no constructor reads: top-level keys, and the `trainer` keys the entry point reads before the Trainer exists
# (seqrec/compose.py ENTRY_POINT_KEYS): path -> (type, rule or None).
PLAIN_KEYS = {
    "seed": (int, SEED),
    "optimized_metric": (str, None),
    "kernels": (str, one_of(*kernels.MODES)),
    "trainer.devices": (int, POSITIVE),
    "trainer.deterministic": (bool, None),
}
# a value that only points at another key (`${sampler.batch_size}`) is checked there, not reported twice
_REFERENCE = re.compile(r"^\$\{[\w.]+\}$")


def constructor_rules(constructor) -> dict[str, Rule]:
    """The value rules of a constructor's arguments: its own `RULES`, or `FOREIGN_RULES` for torch's."""
    module = getattr(constructor, "__module__", None) or ""
    for prefix, rules in FOREIGN_RULES.items():
        if module == prefix or module.startswith(prefix + "."):
            return rules
    return rules_of(constructor)


def _value_problem(path: str, value, annotation, rule: Rule | None) -> str | None:
    """The problem with one value (type, finiteness, then range rule), or None."""
    if not _type_ok(value, annotation):
        return f"{path}={value!r}: expected {_describe(annotation)}"
    return violation(path, value, rule)


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


def signature_of(obj) -> tuple[dict, dict, bool]:
    """Parameters, type hints and whether any keyword is accepted. A class whose __init__ takes **kwargs passes them
    to its base class (TiSASRec -> SASRec), so the base's parameters are followed instead of accepting anything."""
    params = dict(inspect.signature(obj).parameters)
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    var_kw = [name for name, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    base = next((b for b in obj.__mro__[1:] if "__init__" in vars(b)), object) if inspect.isclass(obj) else object
    if var_kw and base is not object:
        base_params, base_hints, takes_any = signature_of(base)
        del params[var_kw[0]]
        params.update({k: v for k, v in base_params.items() if k not in params and k != "self"})
        return params, {**base_hints, **hints}, takes_any
    return params, hints, bool(var_kw)


def runtime_args(path: str) -> set[str]:
    """The arguments of the constructor at `path` that the code passes, not the config."""
    return RUNTIME_ARGS | PARTIAL_ARGS.get(path, set())


def target_nodes(node: DictConfig, path: str = ""):
    """(config path, node) for every node with a `_target_` under `node`, parents first. A node reached through an
    interpolation (model.residual: ${residual}) is checked where it is written."""
    for key in node:
        if key == "hydra" or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child, where = node[key], f"{path}.{key}" if path else str(key)
        if isinstance(child, DictConfig):
            if "_target_" in child:
                yield where, child
            yield from target_nodes(child, where)


def _check_node(path: str, node: DictConfig, problems: list[str], schema=None) -> None:
    """Bind `node` to its `_target_`'s signature (or to `schema`, a dataclass) and check every value."""
    target = node.get("_target_") if schema is None else f"{schema.__module__}.{schema.__name__}"
    try:
        obj = get_object(target) if schema is None else schema
    except Exception:
        problems.append(f"{path}._target_: cannot import '{target}'")
        return
    runtime = runtime_args(path)
    params, hints, takes_any = signature_of(obj)
    rules = constructor_rules(obj)
    raw = OmegaConf.to_container(node, resolve=False)  # interpolations as written
    for key in node:
        if key in HYDRA_KEYS or f"{path}.{key}" in PLAIN_KEYS:
            continue
        if key not in params and not takes_any:
            problems.append(_unknown_key(path, str(key), target, [k for k in params if k not in runtime | {"self"}]))
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
        problem = _value_problem(f"{path}.{key}", value, hints.get(key, params[key].annotation), rules.get(key))
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


def _unknown_key(path: str, key: str, target: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(key, accepted, n=2)
    hint = "; did you mean " + " or ".join(f"{path}.{k}" for k in close) + "?" if close else ""
    return f"{path}.{key}: unknown key for {target} (accepted: {', '.join(accepted)}{hint})"


def check_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every unknown key, wrong type and impossible value in `cfg`."""
    problems: list[str] = []
    for path in REQUIRED_NODES:
        node = cfg.get(path)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            problems.append(f"{path}: missing or has no _target_")
    # in the order of REQUIRED_NODES (the order of the build), then any other
    order = {name: i for i, name in enumerate(REQUIRED_NODES)}
    ordered = sorted(target_nodes(cfg), key=lambda found: order.get(found[0].split(".")[0], len(order)))
    nodes = [(path, node, None) for path, node in ordered]
    nodes += [(path, cfg[path], schema) for path, schema in SCHEMAS.items() if isinstance(cfg.get(path), DictConfig)]
    for path, node, schema in nodes:  # a schema's node is absent in a composition without a hardware profile
        try:
            _check_node(path, node, problems, schema)
        except Exception as e:  # an unresolvable interpolation, say
            problems.append(f"{path}: {type(e).__name__}: {e}".splitlines()[0])
    _check_plain_keys(cfg, problems)
    _check_across_keys(cfg, problems)
    _check_sparse_gradients(cfg, problems)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problems):\n  " + "\n  ".join(problems))


def _check_plain_keys(cfg: DictConfig, problems: list[str]) -> None:
    """Types and ranges of the keys no constructor reads (`PLAIN_KEYS`), where their node is present."""
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


def _check_sparse_gradients(cfg: DictConfig, problems: list[str]) -> None:
    """What a sparse item-table gradient (`model.sparse_embedding=true`, set by `optimizer=lazy_adam`) cannot meet:
    a dense optimizer, a whole-table penalty or loss (they would densify it), gradient clipping (torch's
    clip_grad_norm_ cannot take a sparse tensor's norm) and NCCL (no sparse all-reduce; gloo has one)."""
    model, trainer, optimizer, loss = (cfg.get(k) for k in ("model", "trainer", "optimizer", "loss"))
    if not isinstance(model, DictConfig) or model.get("sparse_embedding") is not True:
        return
    with_sparse = "with model.sparse_embedding=true"

    def target(node):
        try:
            return get_object(node.get("_target_"))
        except Exception:  # reported by _check_node
            return None

    if isinstance(optimizer, DictConfig) and not getattr(target(optimizer), "handles_sparse_gradients", False):
        problems.append(
            f"optimizer._target_={optimizer.get('_target_')} {with_sparse}: it cannot apply the item table's sparse "
            "gradient; use optimizer=lazy_adam, or model.sparse_embedding=false"
        )
    if isinstance(loss, DictConfig) and getattr(target(loss), "scores_every_item", False):
        problems.append(
            f"loss._target_={loss.get('_target_')} {with_sparse}: the full softmax scores every item, so the item "
            "table's gradient is dense anyway; use loss=sampled_softmax|bce|gbce, or optimizer=adam"
        )
    if not isinstance(trainer, DictConfig):
        return
    l2, clip, devices, device = (trainer.get(k) for k in ("l2_emb", "grad_clip", "devices", "device"))
    if is_number(l2) and l2 > 0:
        problems.append(
            f"trainer.l2_emb={l2} {with_sparse}: a penalty over the whole item table would make its gradient dense; "
            "set trainer.l2_emb=0 (optimizer.weight_decay decays the rows each step touches)"
        )
    if is_number(clip) and clip > 0:
        problems.append(
            f"trainer.grad_clip={clip} {with_sparse}: torch's clip_grad_norm_ cannot take a sparse gradient's norm; "
            "set trainer.grad_clip=0"
        )
    distributed = cfg.get("distributed")
    backend = distributed.get("backend") if isinstance(distributed, DictConfig) else "auto"
    if isinstance(devices, int) and devices > 1 and isinstance(device, str) and isinstance(backend, str):
        if resolve_backend(backend, device) == "nccl":
            problems.append(
                f"trainer.devices={devices} {with_sparse}: NCCL has no sparse all-reduce; set distributed.backend=gloo "
                "(or trainer.device=cpu), or train on one device"
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
