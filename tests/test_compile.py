"""trainer.compile: the compile cache lives in a private directory (never /tmp/torchinductor_$USER), a shared one is
refused, and a compiled TINY run gives the eager run's results; sampler.length_buckets leaves the loss unchanged
but for rounding."""

from __future__ import annotations

import functools
import os
import stat

import pytest
import torch

from seqrec.compose import build
from seqrec.train import compile as compile_module
from seqrec.train.sampler import TrainSampler
from seqrec.utils.private_dir import UnsafeCacheDir
from tests.conftest import TINY, compose_config


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQREC_CACHE", str(tmp_path / "cache"))
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_the_compile_cache_is_a_private_directory_named_before_anything_compiles(cache_env):
    path = compile_module.use_private_compile_cache()
    assert path == cache_env / "cache" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(path)  # where inductor will write and import its generated code


@pytest.mark.parametrize("variable", ["TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"])
def test_a_cache_directory_others_can_write_is_refused(cache_env, monkeypatch, variable):
    shared = cache_env / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(variable, str(shared))
    with pytest.raises(UnsafeCacheDir, match="writable by other users"):
        compile_module.use_private_compile_cache()


def test_trainer_compile_compiles_the_forward_pass_and_loss_once(cache_env, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # the wiring, not dynamo
    plain = [*TINY, "residual=plain"]  # mHC's C++ kernels would be built into the fresh cache root first
    parts = build(compose_config([*plain, "trainer.compile=true"], cache_env / "run"))
    assert [fn.__name__ for fn in compiled] == ["_forward_loss"] and parts.trainer.forward_loss is compiled[0]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_env / "cache" / "inductor")
    batch = next(iter(parts.sampler.epoch(0)))
    assert torch.isfinite(parts.trainer.train_step(batch))
    assert build(compose_config(plain, cache_env / "eager")).trainer.forward_loss.__name__ == "_forward_loss"


@pytest.mark.slow
def test_a_compiled_tiny_run_gives_the_eager_runs_results(cache_env, monkeypatch):
    """trainer.compile=true through the real trainer. Inductor's C++ code generation takes minutes on these CPUs, so
    the graphs are captured and differentiated by torch.compile (dynamo, AOTAutograd) and run by its "aot_eager"
    backend; the GPU check (bench/gpu_check.sh) runs inductor itself."""
    calls = []

    def spy(fn, **kw):
        calls.append(fn)
        return torch.compile.__wrapped__(fn, backend="aot_eager", **kw)

    spy_compile = functools.wraps(torch.compile)(spy)
    spy_compile.__wrapped__ = torch.compile
    monkeypatch.setattr(torch, "compile", spy_compile)
    results = {}
    for compiled in (False, True):
        overrides = [*TINY, "model=sasrec", "residual=plain", "trainer.num_epochs=1", "sampler.length_buckets=2"]
        overrides.append(f"trainer.compile={str(compiled).lower()}")  # length buckets: few shapes, few traces
        parts = build(compose_config(overrides, cache_env / f"run{compiled}"))
        parts.trainer.fit()
        results[compiled] = parts.trainer.stopping.best_metrics
    torch._dynamo.reset()
    assert len(calls) == 1 and calls[0].__name__ == "_forward_loss"
    assert results[True].keys() == results[False].keys()
    for key, value in results[False].items():
        assert results[True][key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize("model", ["sasrec", "tisasrec"])
def test_length_buckets_change_the_loss_by_rounding_only(tmp_path, model):
    cfg = compose_config([*TINY, f"model={model}", "model.dropout_rate=0.0"], tmp_path)
    parts = build(cfg)
    kw = dict(batch_size=64, maxlen=30, num_negatives=1, seed=0)
    trimmed, bucketed = TrainSampler(parts.data, **kw), TrainSampler(parts.data, length_buckets=2, **kw)
    model_, loss = parts.model.eval(), parts.loss
    for a, b in zip(list(trimmed.epoch(0))[:3], list(bucketed.epoch(0))[:3], strict=True):
        assert b.seq.shape[1] >= a.seq.shape[1]
        values = [loss(model_(x.seq, x.times, x.time_scale), model_.head, x.pos, x.neg) for x in (a, b)]
        torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-6)
