"""Fast kernels as plug-ins for the reference layers in seqrec.nn.

Every layer in seqrec.nn is written once, in plain PyTorch with autograd: that is the definition of the maths.
A faster implementation of the same maths lives here, as a plug-in for one operation on one device type. Before its
reference code runs, a layer asks for a plug-in and, if one applies, hands the call over:

    if (fast := kernels.find("mhc", state.device, self, state)) is not None:
        return fast(self, state, sublayer, keep)

The top-level setting `kernels` chooses: `auto` (default) uses the first registered plug-in that supports the call,
`reference` never uses one (the plain-autograd layers everywhere: for checking a plug-in, or changing the maths).

Operations, and the call a plug-in must implement (same values as the reference to float32 rounding, and the same
gradients for every tensor input and every parameter of the layer):

    "mhc"                 fn(connection: MHCConnection, state (B, L, S, D), sublayer, keep (B, L) | None)
                          -> new state (B, L, S, D); sets connection.last as the reference does (diagnostics)
    "attention"           fn(q, k, v (B, H, L, Dh), ctx: AttentionContext, dropout_p, training) -> (B, H, L, Dh)
    "relation_attention"  fn(q (H, B, L, Dh) scaled by Dh^-1/2, k, v (H, B, L, Dh), time_k, time_v (H, k+1, Dh),
                          index (B, L, L) from relation_index(), dropout_p, cache: dict | None (the forward
                          pass's AttentionContext.cache)) -> (H, B, L, Dh)
    "dropout"             fn(x, p, training) -> x with dropout applied

How to add one (e.g. Triton kernels for mHC on a GPU): write a module here exposing a `Kernel` (its `run` takes
the operation's arguments above; `supports`, given the arguments that `find` receives, says whether it can run
them: dtype, sizes, a compiler or library present), and add "module:attribute" under (operation, device type) in
PLUGINS, e.g. ("mhc", "cuda"): ["seqrec.kernels.mhc_triton:MHC"]. Modules are imported on first use, so a plug-in's
dependencies (a C++ compiler, triton) are needed only where it runs; an import error disables it with one
warning. Test it against the reference for values and gradients (tests/unit/test_kernels.py shows how).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from seqrec.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "reference")


@dataclass(frozen=True)
class Kernel:
    """One plug-in: `run` replaces the reference call; `supports(*args)` (find's arguments) says where it can."""

    run: Callable
    supports: Callable[..., bool] = lambda *args: True


# (operation, device type) -> plug-ins in order of preference, as "module:attribute" (imported on first use)
PLUGINS: dict[tuple[str, str], list[str]] = {
    ("mhc", "cpu"): ["seqrec.kernels.mhc_cpu:MHC"],
    ("mhc", "cuda"): ["seqrec.kernels.mhc_triton:MHC"],  # not yet run on a real GPU (see its docstring)
    ("attention", "cpu"): ["seqrec.kernels.attention:ATTENTION"],
    ("attention", "cuda"): ["seqrec.kernels.causal_attention:CAUSAL"],  # no mask tensor: SDPA may use flash
    ("dropout", "cpu"): ["seqrec.kernels.attention:DROPOUT"],
    ("relation_attention", "cpu"): ["seqrec.kernels.relation_attention:BUCKETED"],
    ("relation_attention", "cuda"): ["seqrec.kernels.relation_attention:BUCKETED"],
}

_mode = "auto"
_loaded: dict[str, Kernel | None] = {}


def use(mode: str) -> str:
    """Set the process-wide choice (`auto` or `reference`); returns the previous one."""
    global _mode
    if mode not in MODES:
        raise ConfigError(f"kernels={mode!r} must be one of {', '.join(MODES)}")
    previous, _mode = _mode, mode
    return previous


@contextmanager
def using(mode: str):
    """`with kernels.using("reference"): ...`: the choice for a block (checking a plug-in against the reference)."""
    previous = use(mode)
    try:
        yield
    finally:
        use(previous)


def mode() -> str:
    return _mode


def _load(spec: str) -> Kernel | None:
    if spec not in _loaded:
        module, attribute = spec.split(":")
        try:
            _loaded[spec] = getattr(importlib.import_module(module), attribute)
        except ImportError as error:
            log.warning("kernel plug-in %s unavailable (%s); using the reference layer", spec, error)
            _loaded[spec] = None
    return _loaded[spec]


def find(op: str, device: torch.device | str, *args) -> Callable | None:
    """The plug-in to run `op` on `device` for these arguments, or None: run the reference code."""
    if _mode == "reference":
        return None
    device_type = device if isinstance(device, str) else device.type
    for spec in PLUGINS.get((op, device_type), ()):
        kernel = _load(spec)
        if kernel is not None and kernel.supports(*args):
            return kernel.run
    return None
