"""Process-group plumbing for DDP: where rank and world size come from, init/destroy, rendezvous ports.

Rank/world come from the environment only: torchrun and torch's elastic launcher set RANK/WORLD_SIZE/LOCAL_RANK;
a multi-task SLURM job started by submitit exports them from SLURM's variables. One process is the same code
with world_size=1. `launch_time()` gives every rank of one launch the same timestamp, so they agree on one run dir.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_PARTITION",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_RESTART_COUNT",
    "SUBMITIT_EXECUTOR",
    "CUDA_VISIBLE_DEVICES",
)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: `source` is single | env (torchrun / elastic) | submitit."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"


def in_submitit_task() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def export_submitit_env() -> bool:
    """In a multi-task SLURM job started by submitit, export RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for env://.

    The port derives from the job id (jobs sharing a node do not collide) unless MASTER_PORT is already set.
    Returns True when it exported.
    """
    if "RANK" in os.environ or not in_submitit_task() or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment  # the `slurm` extra

    # keep CUDA_VISIBLE_DEVICES: SLURM's device list is indexed by local rank (see init_distributed)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def detect() -> DistEnv:
    """Rank/world of this process from the environment (after `export_submitit_env`)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        source = "submitit" if in_submitit_task() else "env"
        return DistEnv(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), source
        )
    return DistEnv()


def in_distributed_env() -> bool:
    """True when some launcher already started this process as one of several ranks."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return in_submitit_task() and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def resolve_device_type(device: str) -> str:
    """'cuda' or 'cpu' for a trainer.device value (auto = cuda when torch sees a GPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def resolve_backend(backend: str, device: str = "auto") -> str:
    """nccl for CUDA tensors, gloo for CPU tensors (backend=auto), or the backend asked for."""
    if backend != "auto":
        return backend
    return "nccl" if resolve_device_type(device) == "cuda" and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the process group described by the environment (a no-op for one process); returns this rank's place.

    Under CUDA every rank binds to GPU `local_rank` first, so `torch.device("cuda")` is its own GPU.
    """
    export_submitit_env()
    env = detect()
    if env.world_size == 1 or dist.is_initialized():
        return env
    backend = resolve_backend(backend, device)
    if resolve_device_type(device) == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info(
        "rank %d/%d joined the %s process group (%s, master %s:%s)",
        env.rank,
        env.world_size,
        backend,
        env.source,
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )
    return env


def destroy_distributed(all_ranks_finished: bool = False) -> None:
    """Leave the process group. `all_ranks_finished`: every rank ended normally, so a last barrier is safe.

    Why the barrier: gloo's worker threads drop their reference to a finished collective's tensors a moment after the
    caller sees it finish, and that needs the GIL. DDP keeps the process group (and those threads) alive past
    `destroy_process_group`, so a rank that returns right after its last all_reduce can reach interpreter shutdown
    while a worker still waits for the GIL: Python then ends that thread inside C++ and the rank aborts ("terminate
    called without an active exception"). The barrier holds no Python tensors and waits with the GIL released, so
    the workers finish their releases while the interpreter is still alive. After an error it is skipped: a lost
    peer would make it wait the whole collective timeout; and if a peer failed at the very end, the barrier's error
    is dropped, since that peer reports its own.
    """
    if not dist.is_initialized():
        return
    if all_ranks_finished:
        try:
            dist.barrier()
        except RuntimeError as e:
            log.debug("last barrier failed (%s): a peer ended with an error", e)
    dist.destroy_process_group()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_port(preferred: int) -> int:
    """`preferred` if it is free, else a free port (logged): for workers that this process starts itself."""
    if preferred and port_is_free(preferred):
        return preferred
    port = free_port()
    log.warning("rendezvous port %s is busy; using free port %d", preferred, port)
    return port


def _process_start_time(pid: int) -> float:
    """Wall-clock start time of `pid` from /proc (Linux), to 1/CLK_TCK s."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks since boot
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def launch_time() -> float:
    """When this run was launched, identical on every rank of one launch.

    A rank started by torchrun (or srun with several tasks) takes its launcher's start time, which its sibling
    ranks share (the parent process); a lone process takes the current time, like Hydra's `${now:}`.
    """
    started_by_launcher = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    if started_by_launcher:
        try:
            return _process_start_time(os.getppid())
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.time()


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def best_amp_dtype() -> str:
    """bfloat16 where the GPU runs it natively (compute capability >= 8.0), else float16 (with a GradScaler);
    bfloat16 on CPU. Not `torch.cuda.is_bf16_supported()`: it says yes on V100/T4, which emulate bf16 slowly."""
    from seqrec.preflight import Machine
    from seqrec.preflight import best_amp_dtype as for_machine

    return for_machine(Machine.probe())


def describe_device(device: str) -> str:
    """One line for the log: which device `trainer.device` resolves to here and why."""
    if resolve_device_type(device) == "cuda" and torch.cuda.is_available():
        i = torch.cuda.current_device()
        return (
            f"cuda:{i} ({torch.cuda.get_device_name(i)}, {torch.cuda.device_count()} visible, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
        )
    why = "asked for" if device == "cpu" else "torch sees no CUDA device"
    return f"cpu ({why}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def allreduce_smoke(backend: str = "gloo") -> float:
    """Worker body of the doctor's smoke test: all-reduce rank+1 and check the sum; returns the sum."""
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        x = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(x)
        expected = world * (world + 1) / 2
        if not torch.allclose(x.cpu(), torch.full((4,), expected)):
            raise RuntimeError(f"all_reduce gave {x.tolist()}, expected {expected}")
        dist.barrier()  # see destroy_distributed
        return float(x[0])
    finally:
        dist.destroy_process_group()


def assert_replicas_equal(model: torch.nn.Module) -> int:
    """Check that every rank holds exactly rank 0's parameters (DDP's invariant); returns the number compared.

    Raises RuntimeError on every rank if any replica differs: that is a bug (e.g. a rank-dependent update), not noise.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    mine = torch.nn.utils.parameters_to_vector([p.detach() for p in model.parameters()])
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((mine - ref).abs().max())], device=mine.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(f"DDP replicas differ from rank 0 (max |diff| {diff.item():.3g} over {mine.numel()} values)")
    log.info("parameters identical on all %d ranks (%d values)", dist.get_world_size(), mine.numel())
    return mine.numel()


def local_launch_config(nproc: int, run_id: str, port: int, **extra):
    """torch elastic's LaunchConfig for `nproc` spawned workers on this machine, rendezvous on 127.0.0.1:`port`."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        start_method="spawn",
        **extra,
    )


# --- liveness: a rank that stops or gets stuck ends the launch -------------------------------------------------------
# Each worker beats from a daemon thread, not from the training loop: a rank waiting in a barrier while rank 0
# evaluates, or reading a big file, keeps beating; only a process whose threads no longer run (SIGSTOP, a frozen
# host, a C call that never lets go of the GIL) goes quiet. Each beat also carries the rank's progress: the number of
# module forward calls so far (a global forward pre-hook: every training step and evaluation batch makes some). A
# rank alive but stuck (a Python loop, a deadlock) keeps beating, but then no rank makes progress, since the others
# soon wait for it in a collective: once training has started, a launch in which no rank has made progress for the
# stall timeout is stuck.

_forward_calls = 0


def _count_forward(module, args) -> None:
    global _forward_calls
    _forward_calls += 1


def beat_interval(stall_timeout_s: float) -> float:
    """Seconds between two beats: several beats per stall window, at most one every 5 s."""
    return min(5.0, max(0.2, stall_timeout_s / 6))


def start_heartbeat(path: Path, interval_s: float) -> None:
    """Write `<pid> <progress>` to `path` every `interval_s` seconds from a daemon thread (the rewrite is the beat)."""
    path = Path(path)
    _write_beat(path, 0)
    torch.nn.modules.module.register_module_forward_pre_hook(_count_forward)

    def beat() -> None:
        while True:
            try:
                _write_beat(path, _forward_calls)
            except OSError:  # the launcher removed the directory: the launch is over
                return
            time.sleep(interval_s)

    threading.Thread(target=beat, name="seqrec-heartbeat", daemon=True).start()


def _write_beat(path: Path, calls: int) -> None:
    """Replace the file whole: written in place, a rank stopped between the truncation and the write (SIGSTOP, a
    frozen node) would leave an empty file that names no pid to kill. The temporary name starts with a dot, so the
    watcher's `rank*` never lists it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()} {calls}")
    os.replace(tmp, path)


def stop_heartbeat(path: Path) -> None:
    """A rank that returns stops beating on purpose: take it off the watch list."""
    Path(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class Stall:
    rank: int | None  # None: every rank is alive, none makes progress (stuck)
    seconds: float


class StallWatcher:
    """The launcher's side: watches the `rank<N>` heartbeat files in `directory` and SIGKILLs the first rank whose
    file has not changed for `stall_timeout_s` (the elastic agent then ends the other ranks); `stalled` says who.

    Times are the watcher's own monotonic clock, taken when it sees a file change, so a clock step on the host or
    a coarse file system timestamp cannot fake a stall. A rank is watched from its first beat on.
    """

    def __init__(self, directory: Path, stall_timeout_s: float):
        self.directory = Path(directory)
        self.stall_timeout_s = float(stall_timeout_s)
        self.poll_s = beat_interval(self.stall_timeout_s)
        self.stalled: Stall | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="seqrec-stall-watcher", daemon=True)

    def __enter__(self) -> StallWatcher:
        if self.stall_timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        last_change: dict[int, tuple[int, float]] = {}  # rank -> (mtime_ns, monotonic time it was first seen)
        progress: dict[int, int] = {}  # rank -> forward calls at its last beat
        pids: dict[int, int] = {}  # rank -> its pid, for a file that can no longer be read whole
        progressed_at: float | None = None  # when any rank last made progress; None until training starts
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            beats = list(self._beats(pids))
            for rank, mtime_ns, pid, calls in beats:
                seen, since = last_change.get(rank, (None, now))
                if mtime_ns != seen:
                    last_change[rank] = (mtime_ns, now)
                elif now - since >= self.stall_timeout_s:  # this process no longer runs
                    self.stalled = Stall(rank, now - since)
                    _kill(pid)
                    return
                if calls > progress.get(rank, 0):
                    progress[rank], progressed_at = calls, now
            if progressed_at is not None and beats and now - progressed_at >= self.stall_timeout_s:
                self.stalled = Stall(None, now - progressed_at)  # alive, but nobody moves: stuck
                for _, _, pid, _ in beats:
                    _kill(pid)
                return

    def _beats(self, pids: dict[int, int]):
        """(rank, mtime_ns, pid, forward calls) of every rank that is beating now. A file that cannot be read whole
        (a writer older than `_write_beat`'s atomic replace, stopped mid-write) still counts, by its rank's last
        known pid and no progress, so that a rank stopped while writing is not lost from the watch."""
        for path in self.directory.glob("rank*"):
            try:
                rank, mtime_ns = int(path.name[4:]), path.stat().st_mtime_ns
            except (OSError, ValueError):  # removed as its rank returned, or not a rank's file
                continue
            try:
                pid, calls = (int(word) for word in path.read_text().split())
            except (OSError, ValueError):
                if rank not in pids:
                    continue
                pid, calls = pids[rank], 0
            pids[rank] = pid
            yield rank, mtime_ns, pid, calls


def _kill(pid: int) -> None:
    """SIGKILL: the one signal a stopped process cannot hold back."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
