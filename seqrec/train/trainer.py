"""The training loop: optimizer steps under a schedule, validation, early stopping, resumable checkpoints, test.

Research hygiene: the best checkpoint is chosen on validation only and the test split is evaluated once, on
that checkpoint. Every epoch ends with an atomic `last.pt` holding everything needed to continue exactly
(model, optimizer, scheduler, scaler, RNG, early-stopping state), so `resume=auto` after a kill reaches the
same result as an unbroken run. Process-wide settings (deterministic kernels, the allocator) are the entry
point's (seqrec/compose.py); the optimizer and the schedule come in as config partials.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from seqrec.errors import CheckpointError, ConfigError, TrainingError
from seqrec.fingerprint import protocol_fingerprint
from seqrec.train.checkpoint import load_checkpoint, write_json
from seqrec.train.checkpointing import Checkpointing
from seqrec.train.compile import compile_step
from seqrec.train.distributed import assert_replicas_equal
from seqrec.train.early_stopping import EarlyStopping
from seqrec.train.placement import AMP_DTYPES, DEVICE, autocast, resolve_device, wrap_ddp
from seqrec.train.resume_policy import allowed_changes, check_resume, check_world_size, schedule_moved
from seqrec.train.run_record import append_launch, write_run_record
from seqrec.train.sampler import prefetch
from seqrec.train.time_limit import TimeLimit
from seqrec.utils.memory import release_free_memory
from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, interval, one_of

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("epoch", "step", "train_seconds", "eval_seconds", "wandb_id")  # checkpointed loop state


class Trainer:
    """Fits a model with a sampler and a loss, evaluates with an Evaluator, logs to a MetricLogger.

    Args (the keys of the `trainer:` config node, besides the built components):
        optimizer: partial optimizer (`optimizer=adam|adamw`), completed with the model's parameters.
        schedule: partial lr schedule (`schedule=constant|cosine`, seqrec/train/schedules.py).
        output_dir: run directory; checkpoints go to `<output_dir>/checkpoints/`.
        num_epochs: epoch budget.
        l2_emb: l2_emb * Σ w² over every embedding table.   grad_clip: max global gradient norm (0 = off).
        eval_every: validate every N epochs (and after the last).
        patience, plateau_decays, plateau_factor, monitor: seqrec/train/early_stopping.py.
        resume: "auto", "never" or a path (seqrec/train/checkpointing.py).
        num_workers: 0 = build batches inline, >= 1 = in a background thread.
        device: "auto" | "cpu" | "cuda[:N]".   amp, amp_dtype: autocast with bfloat16 or float16 (+ GradScaler).
        log_every_steps: progress-bar loss interval.   progress: tqdm progress bars.
        time_limit_min: stop training after this many wall-clock minutes (0 = off; seqrec/train/time_limit.py),
            validate if the last epoch was not, then test the best checkpoint.
        compile: run the step's forward pass and loss through torch.compile (seqrec/train/compile.py).
        run_config: the resolved config, saved in checkpoints and results.json.
    """

    RULES = {
        "num_epochs": POSITIVE,
        "l2_emb": NON_NEGATIVE,
        "grad_clip": NON_NEGATIVE,
        "eval_every": POSITIVE,
        "patience": NON_NEGATIVE,
        "plateau_decays": NON_NEGATIVE,
        "plateau_factor": interval(0, 1, "()"),
        "num_workers": NON_NEGATIVE,
        "device": DEVICE,
        "amp_dtype": one_of(*AMP_DTYPES),
        "log_every_steps": POSITIVE,
        "time_limit_min": NON_NEGATIVE,
    }

    def __init__(self, model: nn.Module, sampler, evaluator, loss, logger, optimizer, schedule, *, output_dir: str,
                 num_epochs: int = 1000, l2_emb: float = 0.0, grad_clip: float = 0.0, eval_every: int = 5,
                 patience: int = 10, plateau_decays: int = 0, plateau_factor: float = 0.1,
                 monitor: str = "val/ndcg@10", resume: str = "auto", num_workers: int = 1, device: str = "auto",
                 amp: bool = False, amp_dtype: str = "bfloat16", log_every_steps: int = 100, progress: bool = True,
                 time_limit_min: float = 0.0, compile: bool = False, run_config: dict | None = None):  # fmt: skip
        self.sampler, self.evaluator, self.loss, self.logger = sampler, evaluator, loss, logger
        self.output_dir = Path(output_dir)
        self.num_epochs, self.l2_emb, self.grad_clip, self.eval_every = num_epochs, l2_emb, grad_clip, eval_every
        self.num_workers, self.log_every_steps, self.progress = num_workers, log_every_steps, progress
        self.run_config = run_config or {}
        self.time_limited = False  # not checkpointed: a resumed run continues under its own, fresh limit
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(device)
        self.raw_model = model.to(self.device)
        self.model = wrap_ddp(self.raw_model, self.device, self.world_size)
        self.time_limit = TimeLimit(time_limit_min, self.device, self.world_size)
        self.amp_dtype = AMP_DTYPES[amp_dtype] if amp else None
        self.stopping = EarlyStopping(monitor, patience, plateau_decays, plateau_factor)
        self.checkpoints = Checkpointing(self.output_dir, resume, self.rank, self.world_size)
        self.optimizer = optimizer(self.raw_model.parameters())
        self.steps_per_epoch = len(sampler)
        self.scheduler = schedule(
            self.optimizer, steps_per_epoch=self.steps_per_epoch, num_epochs=num_epochs, lr_scale=self.stopping.lr_scale
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.embedding_tables = [m.weight for m in self.raw_model.modules() if isinstance(m, nn.Embedding)]
        self.forward_loss = compile_step(self._forward_loss) if compile else self._forward_loss
        self.epoch, self.step = 0, 0  # completed epochs and optimizer steps
        self.train_seconds, self.eval_seconds = 0.0, 0.0
        self.wandb_id = None
        self.already_done = False  # a finished run relaunched: its results.json stands, nothing is redone
        self.resumed_from: Path | None = None

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self, rng_states: list[dict]) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **{key: getattr(self, key) for key in PROGRESS_KEYS},
            **self.stopping.state_dict(),
            "rng": rng_states,
            "config": self.run_config,
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: does not fit this model/config ({str(e).splitlines()[0][:160]})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in PROGRESS_KEYS:
            setattr(self, key, state[key])
        self.stopping.load_state_dict(state)
        self.checkpoints.restore_rng(state["rng"])

    def _save(self, name: str) -> None:
        self.checkpoints.save(name, self.state_dict)

    def maybe_resume(self) -> None:
        path = self.checkpoints.resume_path()
        if path is None:
            return
        state = load_checkpoint(path)
        saved_config = state.get("config") or {}
        check_resume(saved_config, self.run_config, path)
        check_world_size(len(state["rng"]), self.world_size, path)
        self.load_state_dict(state, path)
        self.resumed_from = path
        moved = schedule_moved(saved_config, self.run_config)
        if moved:
            log.warning("resuming a run trained with %s: the lr curve changes from here on", moved)
        if self.stopping.reconsider(self.epoch):  # more patience or a plateau decay continues a stopped run
            self._apply_lr_decay()
        self.already_done = self.finished and (self.output_dir / "results.json").is_file()
        if self.already_done:
            return
        self.logger.truncate_after(self.epoch)
        if self.rank == 0:
            append_launch(self.output_dir, self.epoch, allowed_changes(saved_config, self.run_config))
        s = self.stopping
        log.info("resumed from %s at epoch %d (best %s=%.4f at epoch %d)", path, self.epoch, s.monitor,
                 s.best_value, s.best_epoch)  # fmt: skip

    def _apply_lr_decay(self) -> None:
        """The scheduler already set the next step's lr before a plateau decay; set it again so it starts there."""
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.step)

    # --- training ------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.stopping.stopped_early or self.epoch >= self.num_epochs

    def fit(self) -> dict:
        """Train until the epoch budget or early stopping; returns the best validation metrics."""
        self.maybe_resume()
        if self.already_done:
            log.info("run already finished at epoch %d; its results.json is kept as it is", self.epoch)
            return self.stopping.best_metrics
        if self.rank == 0 and not self.checkpoints.continues_itself(self.resumed_from):
            write_run_record(self.output_dir, self.run_config)  # once, when this launch starts the run
        # after resuming, so a requeued job continues the W&B run whose id its checkpoint saved
        record = {**self.run_config, "protocol": self.protocol}  # W&B groups and filters runs by protocol too
        self.wandb_id = self.logger.start(record, self.wandb_id) or self.wandb_id
        if self.finished:
            log.info("training already finished (epoch %d); nothing to do", self.epoch)
        while not self.finished:
            record = {"train/loss": self.train_epoch()}
            self.epoch += 1
            record.update({"train/lr": self.scheduler.get_last_lr()[0], "train/seconds": self.train_seconds})
            self.time_limited = self.time_limit.passed()
            if self.epoch % self.eval_every == 0 or self.epoch == self.num_epochs or self.time_limited:
                record.update(self.validate())
                record.update(self.residual_diagnostics())
            self.logger.log(record, epoch=self.epoch, step=self.step)
            self._save("last.pt")
            if self.device.type == "cpu":
                release_free_memory()  # the epoch's fragmented heap (seqrec/utils/memory.py)
            if self.time_limited:
                log.info("time limit of %.1f min reached after epoch %d; testing the best checkpoint",
                         self.time_limit.minutes, self.epoch)  # fmt: skip
                break
        assert_replicas_equal(self.raw_model)  # DDP keeps ranks identical; a difference is a bug, not noise
        return self.stopping.best_metrics

    def train_epoch(self) -> float:
        self.model.train()
        start = time.perf_counter()
        batches = self.sampler.epoch(self.epoch)
        batches = prefetch(batches) if self.num_workers > 0 else batches
        hide = not self.progress or self.rank != 0
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}", leave=False, disable=hide)
        # the losses add up on the device: the host reads them (and waits for the GPU) only for the progress bar,
        # every log_every_steps steps, and once at the end of the epoch; nothing in a step makes it wait
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(bar):
            total += self.train_step(batch.to(self.device))
            if not bar.disable and (i + 1) % self.log_every_steps == 0:
                bar.set_postfix(loss=f"{total.item() / (i + 1):.4f}")
        mean = (total / max(self.steps_per_epoch, 1)).item()
        self.train_seconds += time.perf_counter() - start
        if not math.isfinite(mean):
            raise TrainingError(
                f"loss became {mean} in epoch {self.epoch + 1}; stopped, the last good checkpoint is "
                f"{self.checkpoints.last} (epoch {self.epoch}); try a lower optimizer.lr (e.g. 0.0005) "
                "or trainer.grad_clip=1.0"
            )
        return mean

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step on a batch already on the device; returns the loss as a device tensor.

        Launch-light: nothing here waits for the GPU (no .item(), no data-dependent shape: the losses weight
        padding by 0 instead of selecting targets), so the host queues the next step while the GPU runs this one
        (tests/test_gpu.py runs it under torch.cuda.set_sync_debug_mode("error")). The one exception is float16
        AMP: GradScaler reads its inf check on the host in scaler.step."""
        with autocast(self.device, self.amp_dtype):
            # the batch's weight is a Python float that changes every batch: applied outside the compiled part
            loss = self.forward_loss(batch.seq, batch.times, batch.time_scale, batch.pos, batch.neg) * batch.loss_weight
            if self.l2_emb > 0:
                loss = loss + self.l2_emb * sum(w.pow(2).sum() for w in self.embedding_tables)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.detach().float()

    def _forward_loss(self, seq, times, time_scale, pos, neg) -> torch.Tensor:
        """The batch's mean loss: the part of a step that trainer.compile compiles (the backward follows it)."""
        h = self.model(seq, times, time_scale)
        return self.loss(h, self.raw_model.head, pos, neg)

    def residual_diagnostics(self) -> dict:
        """The residual's health numbers (mHC: H_res row/column sums, gains, gates) from the latest forward pass;
        logged with each validation, not into results.json. Empty for the plain residual."""
        diagnostics = getattr(getattr(self.raw_model, "residual", None), "diagnostics", None)
        return diagnostics(self.raw_model) if diagnostics is not None else {}

    def validate(self) -> dict:
        start = time.perf_counter()
        metrics = self.evaluator.evaluate(self.raw_model, "valid", self.device)
        self.eval_seconds += time.perf_counter() - start
        s = self.stopping
        if s.monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={s.monitor} is not a validation metric; choose one of {sorted(metrics)}"
            )
        outcome = s.observe(metrics, self.epoch)
        if outcome == "best":
            self._save("best.pt")
        elif outcome == "decay":
            self._apply_lr_decay()
        shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "@10" in k)
        log.info("epoch %d  %s  (best %.4f at epoch %d)", self.epoch, shown, s.best_value, s.best_epoch)
        return metrics

    @functools.cached_property
    def protocol(self) -> dict:
        """The evaluation protocol's fingerprint (data, split, targets, metrics): which runs may be compared.
        Computed once: it hashes the whole dataset."""
        return protocol_fingerprint(self.evaluator.data, self.evaluator)

    def test(self) -> dict:
        """Evaluate the test split once, on the best (validation-selected) checkpoint; write results.json.
        A finished run relaunched is not tested again: its results.json is read and returned as it is."""
        if self.already_done:
            results = json.loads((self.output_dir / "results.json").read_text())
            shown = "  ".join(f"{k}={v:.4f}" for k, v in results.items() if k.startswith("test/") and "@10" in k)
            log.info("stored results (best epoch %s): %s", results.get("best_epoch"), shown)
            return results
        if self.checkpoints.best.exists():
            self.raw_model.load_state_dict(load_checkpoint(self.checkpoints.best)["model"])
        start = time.perf_counter()
        test_metrics = self.evaluator.evaluate(self.raw_model, "test", self.device)
        self.evaluator.write_test_ranks(self.output_dir)  # for tests paired over users (seqrec.results)
        self.eval_seconds += time.perf_counter() - start
        s = self.stopping
        results = dict(best_epoch=s.best_epoch, epochs_run=self.epoch, stopped_early=s.stopped_early,
                       time_limited=self.time_limited, train_seconds=round(self.train_seconds, 3),
                       eval_seconds=round(self.eval_seconds, 3), monitor=s.monitor, steps=self.step)  # fmt: skip
        results |= {**s.best_metrics, **test_metrics, "protocol": self.protocol, "config": self.run_config}
        if self.rank == 0:
            write_json(results, self.output_dir / "results.json")
        self.logger.summary({k: v for k, v in results.items() if k not in ("config", "protocol")})
        shown = "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@10" in k)
        log.info("test (best epoch %d): %s", s.best_epoch, shown)
        return results
