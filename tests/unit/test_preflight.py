"""GPU pre-flight checks: each machine a user can land on, described as torch would report it."""

from __future__ import annotations

import torch

from seqrec.preflight import Gpu, Machine, arch_supported, best_amp_dtype, check, native_bf16, slow_settings

V100, A100, H200 = Gpu("Tesla V100-SXM2-32GB", (7, 0)), Gpu("NVIDIA A100", (8, 0)), Gpu("NVIDIA H200", (9, 0))
CU128_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")  # no Volta
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def box(*gpus: Gpu, arch=CU126_ARCHS, nccl=True) -> Machine:
    return Machine(gpus=gpus, torch_cuda="12.6", arch_list=arch, nccl=nccl, torch_version="2.x")


def test_this_machine_is_probed_from_torch():
    machine = Machine.probe()
    assert len(machine.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert machine.torch_version == torch.__version__
    assert machine.cpu_bf16 in (True, False, None)


def test_a_healthy_four_gpu_box_has_no_problems():
    assert check(box(V100, V100, V100, V100), device="cuda", devices=4, amp=True, amp_dtype="float16") == []
    assert check(box(H200), device="cuda", devices=1, amp=True, amp_dtype="bfloat16") == []


def test_cuda_asked_for_on_a_cpu_only_machine_is_one_line():
    problems = check(Machine(torch_version="2.x"), device="cuda", devices=4)
    assert len(problems) == 1 and "sees no GPU" in problems[0] and "hardware=cpu" in problems[0]


def test_fewer_gpus_than_ranks_is_caught_before_every_rank_lands_on_gpu_0():
    (problem,) = check(box(V100, V100), device="cuda", devices=4, amp_dtype="float16", amp=True)
    assert "trainer.devices=4" in problem and "2 GPU(s)" in problem and "trainer.devices=2" in problem


def test_ranks_on_other_nodes_do_not_count_against_this_nodes_gpus():
    assert check(box(V100, V100), device="cuda", devices=4, ranks_here=2, amp=True, amp_dtype="float16") == []


def test_ddp_on_gpus_without_nccl_says_so():
    (problem,) = check(box(A100, A100, nccl=False), device="cuda", devices=2)
    assert "NCCL" in problem


def test_a_v100_under_a_wheel_without_volta_kernels_gets_the_fix():
    (problem,) = check(box(V100, arch=CU128_ARCHS), device="cuda", devices=1)
    assert "sm_70" in problem and "pip install torch" in problem


def test_architecture_compatibility_follows_cuda_rules():
    assert arch_supported((8, 6), ("sm_80",))  # a binary runs on later minors of its major version
    assert not arch_supported((7, 0), ("sm_75", "sm_80"))  # but not on an earlier minor or another major
    assert arch_supported((9, 0), ("sm_80", "compute_80"))  # PTX of an older architecture is JIT-compiled
    assert not arch_supported((7, 0), ("sm_80", "compute_80"))
    assert arch_supported((7, 0), ())  # torch did not say: no guess


def test_bf16_is_native_from_ampere_on_and_auto_picks_float16_below():
    assert not native_bf16((7, 0)) and not native_bf16((7, 5)) and native_bf16((8, 0)) and native_bf16((9, 0))
    assert best_amp_dtype(box(V100)) == "float16"
    assert best_amp_dtype(box(H200)) == "bfloat16"
    assert best_amp_dtype(Machine()) == "bfloat16"  # CPU autocast
    (problem,) = check(box(V100), device="cuda", devices=1, amp=True, amp_dtype="bfloat16")
    assert "emulated" in problem and "trainer.amp_dtype=float16" in problem


def test_bf16_autocast_on_a_cpu_without_bf16_kernels_is_one_warning_line_with_its_fix():
    avx2, avx512, unknown = Machine(cpu_bf16=False), Machine(cpu_bf16=True), Machine()
    for device in ("cpu", "auto"):
        (slow,) = slow_settings(avx2, device=device, amp=True, amp_dtype="bfloat16")
        assert "trainer.amp=false" in slow and "\n" not in slow
    assert slow_settings(avx2, device="cpu", amp=False) == []  # float32: nothing is emulated
    assert slow_settings(avx2, device="cpu", amp=True, amp_dtype="float16") == []
    assert slow_settings(avx512, device="cpu", amp=True, amp_dtype="bfloat16") == []
    assert slow_settings(unknown, device="cpu", amp=True, amp_dtype="bfloat16") == []  # no guessing
    gpu_box = Machine(gpus=(H200,), cpu_bf16=False)
    assert slow_settings(gpu_box, device="auto", amp=True, amp_dtype="bfloat16") == []  # autocast runs on the GPU
    assert check(avx2, device="cpu", devices=1, amp=True, amp_dtype="bfloat16") == []  # a warning, not a refusal


def test_the_run_warns_before_training_when_cpu_autocast_would_be_emulated(monkeypatch, tmp_path, caplog):
    import logging

    from conftest import compose_config

    import seqrec.preflight as preflight

    monkeypatch.setattr(preflight, "_cpu_bf16", lambda: False)
    cfg = compose_config(["hardware=cpu", "trainer.amp=true", "trainer.amp_dtype=bfloat16"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="seqrec.preflight"):
        preflight.check_run(cfg)
    assert [r.getMessage() for r in caplog.records] == slow_settings(
        Machine(cpu_bf16=False), device="cpu", amp=True, amp_dtype="bfloat16"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="seqrec.preflight"):
        preflight.check_run(compose_config(["hardware=cpu"], tmp_path))  # float32 on the CPU: silent
    assert caplog.records == []


def test_cpu_ddp_with_nccl_asked_for_is_refused():
    (problem,) = check(Machine(), device="cpu", devices=2, backend="nccl")
    assert "gloo" in problem
    assert check(Machine(), device="cpu", devices=2, backend="auto") == []


def test_a_slurm_launcher_without_its_plugin_is_one_line(monkeypatch):
    import importlib.util

    from seqrec.preflight import missing_launcher

    real = importlib.util.find_spec
    assert (
        missing_launcher(["-m", "hydra/launcher=slurm"]) is None
        or real("hydra_plugins.hydra_submitit_launcher") is None
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "submitit" in name else real(name, *a))
    problem = missing_launcher(["-m", "hydra/launcher=slurm", "hardware=4xv100"])
    assert problem is not None and "seqrec[slurm]" in problem and "\n" not in problem
    assert missing_launcher(["hardware=4xv100", "model=tisasrec"]) is None  # a local run needs no plugin
