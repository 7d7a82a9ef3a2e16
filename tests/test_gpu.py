"""GPU-only precision and DDP paths (skipped without CUDA): fp16 + GradScaler, bf16, NCCL workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, compose_config
from test_amp import _trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _steps(trainer, n: int = 3) -> None:
    for batch in list(trainer.sampler.epoch(0))[:n]:
        loss = trainer.train_step(batch.to(trainer.device))
        assert torch.isfinite(loss), loss
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_fp16_with_grad_scaler_step(tmp_path):
    cfg = compose_config(TINY + ["hardware=4xv100", "trainer.devices=1", "trainer.device=cuda"], tmp_path)
    trainer = _trainer(cfg, tmp_path)
    assert trainer.amp_dtype is torch.float16 and trainer.scaler.is_enabled()
    _steps(trainer)
    assert trainer.scaler.get_scale() > 0


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_bf16_step(tmp_path):
    cfg = compose_config(TINY + ["hardware=1gpu", "trainer.device=cuda"], tmp_path)
    trainer = _trainer(cfg, tmp_path, amp_dtype="bfloat16")
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    _steps(trainer)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_workers(tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "hardware=4xv100", "trainer.devices=2",
           "trainer.device=cuda", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["epochs_run"] == 2
