"""Value rules of config keys, declared beside the constructor that reads the key.

A class lists the rules of its keyword arguments in a `RULES` dict next to `__init__`; a factory function gets
them from the `config_rules` decorator (which sets the same attribute):

    class Evaluator:
        RULES = {"batch_size": POSITIVE, "protocol": one_of("full", "sampled")}

        def __init__(self, data, *, protocol: str = "full", batch_size: int = 512): ...

    @config_rules(warmup_steps=NON_NEGATIVE, decay_rate=interval(0, 1, "(]"))
    def constant(optimizer, *, warmup_steps: int = 100, decay_rate: float = 0.95): ...

The pre-flight checker (seqrec/utils/config.py) binds each `_target_` node of the composed config to its
constructor's signature and applies these rules to the values that have the annotated type; a None value is not
checked. A float is always checked for finiteness, so a float without a natural range takes `FINITE`. Every
numeric argument of every constructor the config reaches has a rule (tests/test_configs.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    holds: Callable[[object], bool]
    expected: str  # what a refused value is told, after "<key>=<value>: "


POSITIVE = Rule(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
FINITE = Rule(lambda v: True, "must be a finite number")  # the finiteness check every float gets, nothing more
SEED = Rule(lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")  # numpy and torch refuse negative seeds


def at_least(low: float, why: str = "") -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}" + (f" ({why})" if why else ""))


def interval(low: float, high: float, ends: str = "[]") -> Rule:
    """low <= v <= high, where `ends` ("[]", "[)", "(]" or "()") says which bounds are included."""
    above = (lambda v: v >= low) if ends[0] == "[" else (lambda v: v > low)
    below = (lambda v: v <= high) if ends[1] == "]" else (lambda v: v < high)
    return Rule(lambda v: above(v) and below(v), f"must be in {ends[0]}{low}, {high}{ends[1]}")


UNIT_INTERVAL = interval(0, 1)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "must be one of " + ", ".join(choices))


def is_number(v) -> bool:
    """An int or float config value (a bool is not a number here)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


# torch.optim's Adam family (and seqrec's LazyAdam, which takes the same arguments)
ADAM_RULES = {
    "lr": POSITIVE,
    "betas": Rule(lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v), "must be [b1, b2] in [0, 1)"),
    "eps": POSITIVE,
    "weight_decay": NON_NEGATIVE,
}


def config_rules(**rules: Rule):
    """Decorator: the rules of a factory function's keyword arguments, as a class's `RULES`."""

    def attach(function):
        function.RULES = rules
        return function

    return attach


def rules_of(constructor) -> dict[str, Rule]:
    """The rules a class or function declares for its arguments (a class inherits its base's `RULES`)."""
    return getattr(constructor, "RULES", None) or {}


def violation(key: str, value, rule: Rule | None) -> str | None:
    """'<key>=<value>: <what was expected>' for a non-finite float or a value that breaks `rule`, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value!r}: must be a finite number"
    if rule is not None and value is not None and not rule.holds(value):
        return f"{key}={value!r}: {rule.expected}"
    return None
