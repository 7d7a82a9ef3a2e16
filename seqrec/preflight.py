"""GPU pre-flight: what this machine can run, checked before any data is loaded.

Each problem is one line with its fix, so that a 4-GPU job fails in a second instead of after every rank has loaded
the data (fewer GPUs than `trainer.devices` used to put every rank on GPU 0 until NCCL aborted; a torch CUDA wheel
without kernels for the GPU's architecture fails at the first kernel launch; `torch.cuda.is_bf16_supported()` says
yes on V100/T4, where bfloat16 is emulated and slow). A CPU without bfloat16 kernels (x86 without AVX-512, e.g. many
AMD EPYC and older Intel parts) is not an error but a warning: autocast there makes a training step about 16x
slower than float32 (bench/bench_cpu_amp.py).

The machine is described by a `Machine` record, read from torch by `Machine.probe()`; the checks are pure functions
of it, so every case is testable on a CPU-only box.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: bfloat16 tensor cores; older GPUs emulate it


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]  # (major, minor), e.g. (7, 0) for a V100


@dataclass(frozen=True)
class Machine:
    """What torch reports about this machine's accelerators."""

    gpus: tuple[Gpu, ...] = ()
    torch_cuda: str | None = None  # the CUDA version torch was built with; None for a CPU build
    arch_list: tuple[str, ...] = ()  # architectures compiled into torch, e.g. ("sm_80", "sm_90", "compute_90")
    nccl: bool = False
    gloo: bool = True
    torch_version: str = ""
    cpu_bf16: bool | None = None  # oneDNN has bfloat16 kernels for this CPU (AVX-512 or Arm bf16); None: unknown
    notes: tuple[str, ...] = field(default_factory=tuple)

    @staticmethod
    def probe() -> Machine:
        import torch
        import torch.distributed as dist

        gpus: tuple[Gpu, ...] = ()
        arch: tuple[str, ...] = ()
        if torch.cuda.is_available():
            gpus = tuple(
                Gpu(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())
            )
            arch = tuple(torch.cuda.get_arch_list())
        return Machine(
            gpus=gpus,
            torch_cuda=torch.version.cuda,
            arch_list=arch,
            nccl=dist.is_available() and dist.is_nccl_available(),
            gloo=dist.is_available() and dist.is_gloo_available(),
            torch_version=torch.__version__,
            cpu_bf16=_cpu_bf16(),
        )


def _cpu_bf16() -> bool | None:
    """Whether CPU autocast to bfloat16 runs on kernels made for it. Without them (an AVX2-only x86) every bf16
    matmul is converted and computed the slow way: 18-43x slower than float32 on a 2-core AMD EPYC with AVX2."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN, or the op renamed: do not guess
        return None


def native_bf16(capability: tuple[int, int]) -> bool:
    """bfloat16 runs on the tensor cores from compute capability 8.0 on; below, torch emulates it (slowly)."""
    return tuple(capability) >= NATIVE_BF16_CAPABILITY


def best_amp_dtype(machine: Machine) -> str:
    """bfloat16 on the CPU and on GPUs with native bf16; float16 (+ GradScaler) on older GPUs."""
    if not machine.gpus:
        return "bfloat16"
    return "bfloat16" if all(native_bf16(g.capability) for g in machine.gpus) else "float16"


def _compiled_capabilities(arch_list: tuple[str, ...]) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(binary sm_XY targets, PTX compute_XY targets) compiled into torch."""
    sm, ptx = set(), set()
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if found:
            cap = (int(found.group(2)), int(found.group(3)))
            (sm if found.group(1) == "sm" else ptx).add(cap)
    return sm, ptx


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether torch carries kernels for a GPU: a binary for its major version at or below its minor (binaries are
    forward compatible within a major version), or PTX for an older architecture that the driver can JIT."""
    if not arch_list:  # torch did not say: do not block the run on a guess
        return True
    sm, ptx = _compiled_capabilities(arch_list)
    major, minor = capability
    if any(m == major and n <= minor for m, n in sm):
        return True
    return any((m, n) <= (major, minor) for m, n in ptx)


def check(
    machine: Machine,
    *,
    device: str,
    devices: int,
    backend: str = "auto",
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    ranks_here: int | None = None,
) -> list[str]:
    """Every problem with running `devices` ranks on `device` here, one line each (empty: all clear).

    Args:
        device: trainer.device (auto | cpu | cuda | cuda:N).
        devices: trainer.devices, the number of ranks.
        backend: distributed.backend (auto | nccl | gloo).
        ranks_here: ranks that will share this machine's GPUs (None: all `devices`; a multi-node launch passes its
            tasks per node).
    """
    problems: list[str] = []
    wants_cuda = device.startswith("cuda") or (device == "auto" and bool(machine.gpus))
    if device.startswith("cuda") and not machine.gpus:
        build = f"a CUDA {machine.torch_cuda} build" if machine.torch_cuda else "a CPU-only build"
        problems.append(
            f"trainer.device={device}: torch {machine.torch_version} ({build}) sees no GPU here; "
            "use hardware=cpu, or install a CUDA build of torch on a GPU machine"
        )
        return problems
    if not wants_cuda:
        if devices > 1 and backend == "nccl":
            problems.append("distributed.backend=nccl needs GPUs; on the CPU use distributed.backend=gloo (or auto)")
        elif devices > 1 and not machine.gloo:
            problems.append("trainer.devices>1 on the CPU needs torch's gloo backend, which this torch build lacks")
        return problems
    per_machine = devices if ranks_here is None else ranks_here
    if per_machine > len(machine.gpus):
        problems.append(
            f"trainer.devices={devices} but this machine has {len(machine.gpus)} GPU(s) "
            f"({', '.join(g.name for g in machine.gpus)}): set trainer.devices={len(machine.gpus)}, "
            "or run on a machine with more GPUs (every extra rank would share GPU 0 and NCCL would abort)"
        )
    if devices > 1 and backend in ("auto", "nccl") and not machine.nccl:
        problems.append(
            "DDP on GPUs needs NCCL, which this torch build lacks (e.g. a CPU or Windows build): install a CUDA build "
            "of torch for Linux, or set distributed.backend=gloo (slow)"
        )
    for gpu in set(machine.gpus):
        if not arch_supported(gpu.capability, machine.arch_list):
            cap = f"sm_{gpu.capability[0]}{gpu.capability[1]}"
            problems.append(
                f"{gpu.name} ({cap}) is not among the architectures this torch {machine.torch_version} was built for "
                f"({' '.join(machine.arch_list)}): install a torch wheel built for {cap}, e.g. "
                f"`pip install torch --index-url https://download.pytorch.org/whl/cu126` (CUDA 12.6 wheels still "
                "carry sm_70)"
            )
    if amp and amp_dtype == "bfloat16":
        slow = sorted({g.name for g in machine.gpus if not native_bf16(g.capability)})
        if slow:
            problems.append(
                f"trainer.amp_dtype=bfloat16 on {', '.join(slow)} (compute capability < 8.0) is emulated and slow: "
                "use trainer.amp_dtype=float16 (the GradScaler is added for you)"
            )
    return problems


def slow_settings(machine: Machine, *, device: str, amp: bool = False, amp_dtype: str = "bfloat16") -> list[str]:
    """Settings that run, but far slower here than another choice would; one line each with the fix."""
    on_cpu = device == "cpu" or (device == "auto" and not machine.gpus)
    if on_cpu and amp and amp_dtype == "bfloat16" and machine.cpu_bf16 is False:
        return [
            "trainer.amp=true (bfloat16) on a CPU without bfloat16 kernels (no AVX-512): autocast makes a training "
            "step about 16x slower than float32; add trainer.amp=false (float32: another run's numerics, not a resume "
            "of this one)"
        ]
    return []


LAUNCHER_EXTRAS = {"slurm": "slurm", "submitit_slurm": "slurm", "submitit_local": "slurm"}  # launcher -> extra


def missing_launcher(argv: list[str]) -> str | None:
    """One line when the command line picks a Hydra launcher whose plugin is not installed, else None.

    Hydra would fail while composing, with a message about a missing config file; checked before Hydra starts so
    that the user reads which extra to install.
    """
    for arg in argv:
        name, _, value = arg.lstrip("+~").partition("=")
        extra = LAUNCHER_EXTRAS.get(value) if name == "hydra/launcher" else None
        if extra and not _importable("hydra_plugins.hydra_submitit_launcher"):
            return (
                f"hydra/launcher={value} needs the hydra-submitit-launcher plugin: pip install 'seqrec[{extra}]' "
                "(a run on this machine needs no launcher: drop -m, or use hydra/launcher=basic)"
            )
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing too (no Hydra plugin at all)
        return False


def check_run(cfg) -> None:
    """Raise one ConfigError listing every hardware problem of the composed config `cfg` on this machine."""
    import os

    from seqrec.errors import ConfigError

    trainer = cfg.trainer
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")  # ranks on this node
    machine = Machine.probe()
    problems = check(
        machine,
        device=str(trainer.device),
        devices=int(trainer.devices),
        backend=str(cfg.distributed.backend),
        amp=bool(trainer.amp),
        amp_dtype=str(trainer.amp_dtype),
        ranks_here=int(local) if local and local.isdigit() else None,
    )
    for slow in slow_settings(
        machine, device=str(trainer.device), amp=bool(trainer.amp), amp_dtype=str(trainer.amp_dtype)
    ):
        log.warning(slow)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} hardware problems:\n  " + "\n  ".join(problems))
