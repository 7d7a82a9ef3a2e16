"""Environment check before a big job: `python -m seqrec.doctor [--port 29500] [--no-smoke]`.

Reports the devices torch sees, CUDA / NCCL / gloo availability, bf16 support, whether the rendezvous port is free,
the SLURM and torchrun variables of this shell, and runs a 2-rank gloo all-reduce (plus NCCL with 2+ GPUs) through
torch's elastic launcher, the same machinery `trainer.devices>1` uses. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import torch
import torch.distributed as dist

from seqrec.kernels import mhc_cpu as mhc_native
from seqrec.preflight import Machine
from seqrec.train.distributed import (
    ENV_KEYS,
    SLURM_KEYS,
    allreduce_smoke,
    best_amp_dtype,
    free_port,
    local_launch_config,
    port_is_free,
)


def _smoke(backend: str, nproc: int = 2) -> tuple[bool, str]:
    from torch.distributed.launcher.api import elastic_launch

    config = local_launch_config(nproc, f"doctor-{backend}", free_port())
    start = time.perf_counter()
    try:
        out = elastic_launch(config, allreduce_smoke)(backend)
    except Exception as e:  # report any launcher/collective failure as a failed check
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    expected = nproc * (nproc + 1) / 2
    ok = all(v == expected for v in out.values())
    seconds = time.perf_counter() - start
    return ok, f"{nproc}-rank all_reduce -> {sorted(out.values())} (expected {expected:g}) in {seconds:.1f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrec.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port to check (distributed.master_port)")
    parser.add_argument("--no-smoke", action="store_true", help="skip the multi-process all-reduce tests")
    args = parser.parse_args(argv)
    failures: list[str] = []

    def line(name: str, value) -> None:
        print(f"{name:<22} {value}")

    line("python", f"{sys.version.split()[0]} ({platform.platform()})")
    line("torch", torch.__version__)
    line("cpu cores", f"{os.cpu_count()} (torch threads {torch.get_num_threads()})")
    cuda = torch.cuda.is_available()
    line(
        "cuda",
        f"yes, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"
        if cuda
        else f"no (torch built with CUDA {torch.version.cuda})",
    )
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        line(f"  cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    line(
        "bf16",
        ("yes" if torch.cuda.is_bf16_supported() else "no (use float16 + GradScaler)") if cuda else "n/a on GPU",
    )
    cpu_bf16 = Machine.probe().cpu_bf16
    line(
        "cpu bf16 kernels",
        {True: "yes (trainer.amp=true on the CPU is fast)", None: "unknown (torch without oneDNN)"}.get(
            cpu_bf16, f"no ({torch.backends.cpu.get_cpu_capability()}: keep trainer.amp=false on the CPU)"
        ),
    )
    line("amp_dtype auto ->", best_amp_dtype())
    kernels = mhc_native.library()  # builds them on first use (~20 s), as the first mHC training step would
    line(
        "mHC C++ kernels",
        f"built ({getattr(kernels, '_name', '?')})"
        if kernels is not None
        else "NOT available (no C++ compiler): mHC runs its eager PyTorch path, ~1.6x plain's time instead of ~1.3x",
    )
    line("distributed", "available" if dist.is_available() else "NOT available")
    line("gloo", "yes" if dist.is_gloo_available() else "no")
    nccl = dist.is_nccl_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if nccl and cuda else None
    line("nccl", f"yes ({nccl_version})" if nccl_version else ("yes" if nccl else "no"))
    if port_is_free(args.port):
        line("rendezvous port", f"{args.port} free")
    else:
        line(
            "rendezvous port",
            f"{args.port} BUSY (train.py falls back to a free one, e.g. {free_port()}; "
            f"for torchrun pass --master_port)",
        )
    line("slurm", f"sinfo at {shutil.which('sinfo')}" if shutil.which("sinfo") else "no sinfo on PATH")
    for key in SLURM_KEYS + ENV_KEYS:
        if key in os.environ:
            line(f"  {key}", os.environ[key])
    if not any(k in os.environ for k in SLURM_KEYS + ENV_KEYS):
        line("  env", "no SLURM / torchrun variables set (a plain shell)")

    if not args.no_smoke:
        ok, msg = _smoke("gloo")
        line("gloo smoke test", ("ok: " if ok else "FAILED: ") + msg)
        if not ok:
            failures.append("gloo all-reduce")
        if cuda and nccl and torch.cuda.device_count() >= 2:
            ok, msg = _smoke("nccl", min(torch.cuda.device_count(), 4))
            line("nccl smoke test", ("ok: " if ok else "FAILED: ") + msg)
            if not ok:
                failures.append("nccl all-reduce")
    print("doctor: " + ("all checks passed" if not failures else "FAILED: " + ", ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
