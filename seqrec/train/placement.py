"""Where the model runs: the device, the DDP wrapper across ranks, and mixed-precision autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from seqrec.errors import ConfigError
from seqrec.utils.rules import Rule

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# the `trainer.device` values resolve_device takes
DEVICE = Rule(lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "must be auto, cpu or cuda[:N]")


def resolve_device(device: str) -> torch.device:
    """`trainer.device` as a torch device: auto is the GPU when torch sees one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device}: torch sees no CUDA device; use hardware=cpu")
    return torch.device(device)


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The model as the training step calls it: DDP (gradients averaged across ranks) when there are several."""
    if world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing when mixed precision is off (dtype None)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
