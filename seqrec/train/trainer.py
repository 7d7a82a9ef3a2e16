"""The training loop: optimizer steps under a schedule, validation, early stopping, resumable checkpoints, test.

Research hygiene: the best checkpoint is chosen on validation only and the test split is evaluated once, on
that checkpoint. Every epoch ends with an atomic `last.pt` holding everything needed to continue exactly
(seqrec/train/checkpointing.py), and so does a step boundary inside an epoch when the step clock says so
(seqrec/train/step_clock.py: `checkpoint_every_min`, `time_limit_min`, a preemption signal), so `resume=auto` after
a kill reaches the same result as an unbroken run. Process-wide settings (deterministic kernels, the allocator) are
the entry point's (seqrec/compose.py); the optimizer and the schedule come in as config partials.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from seqrec.errors import ConfigError, TrainingError
from seqrec.fingerprint import protocol_fingerprint
from seqrec.train.checkpoint import load_checkpoint, write_json
from seqrec.train.checkpointing import Checkpointing
from seqrec.train.compile import compile_step
from seqrec.train.distributed import assert_replicas_equal
from seqrec.train.early_stopping import EarlyStopping
from seqrec.train.placement import AMP_DTYPES, DEVICE, autocast, resolve_device, wrap_ddp
from seqrec.train.run_record import write_run_record
from seqrec.train.sampler import prefetch
from seqrec.train.step_clock import StepClock
from seqrec.train.training_state import TrainingState
from seqrec.utils.memory import release_free_memory
from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, interval, one_of

log = logging.getLogger(__name__)


class Trainer:
    """Fits a model with a sampler and a loss, evaluates with an Evaluator, logs to a MetricLogger.

    Args: the built components; `optimizer` and `schedule` are partials (`optimizer=adam|adamw`,
    `schedule=constant|cosine`) completed here with the model's parameters and the epoch length; the other keyword
    arguments are the `trainer:` config node's keys, each explained in conf/train.yaml (`time_limit_min`,
    `checkpoint_every_min`: seqrec/train/step_clock.py; `patience` & co.: seqrec/train/early_stopping.py; `resume`:
    seqrec/train/checkpointing.py; `compile`: seqrec/train/compile.py); `run_config` is the resolved config, saved in
    checkpoints and results.json.
    """

    RULES = {
        **dict.fromkeys(("num_epochs", "eval_every", "log_every_steps"), POSITIVE),
        **dict.fromkeys(("l2_emb", "grad_clip", "patience", "plateau_decays", "num_workers"), NON_NEGATIVE),
        **dict.fromkeys(("time_limit_min", "checkpoint_every_min"), NON_NEGATIVE),
        "plateau_factor": interval(0, 1, "()"),
        "device": DEVICE,
        "amp_dtype": one_of(*AMP_DTYPES),
    }

    def __init__(self, model: nn.Module, sampler, evaluator, loss, logger, optimizer, schedule, *, output_dir: str,
                 num_epochs: int = 1000, l2_emb: float = 0.0, grad_clip: float = 0.0, eval_every: int = 5,
                 patience: int = 10, plateau_decays: int = 0, plateau_factor: float = 0.1,
                 monitor: str = "val/ndcg@10", resume: str = "auto", num_workers: int = 1, device: str = "auto",
                 amp: bool = False, amp_dtype: str = "bfloat16", log_every_steps: int = 100, progress: bool = True,
                 time_limit_min: float = 0.0, checkpoint_every_min: float = 0.0, compile: bool = False,
                 run_config: dict | None = None):  # fmt: skip
        self.sampler, self.evaluator, self.loss, self.logger = sampler, evaluator, loss, logger
        self.output_dir = Path(output_dir)
        self.num_epochs, self.l2_emb, self.grad_clip, self.eval_every = num_epochs, l2_emb, grad_clip, eval_every
        self.num_workers, self.log_every_steps, self.show_bars = num_workers, log_every_steps, progress
        self.run_config = run_config or {}
        self.time_limited = False  # not checkpointed: a resumed run continues under its own, fresh limit
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(device)
        self.raw_model = model.to(self.device)
        self.model = wrap_ddp(self.raw_model, self.device, self.world_size)
        self.clock = StepClock(time_limit_min, checkpoint_every_min, self.device, self.rank, self.world_size)
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
        self.state = TrainingState(self.raw_model, self.optimizer, self.scheduler, self.scaler, self.stopping,
                                   self.checkpoints, self.run_config, num_epochs)  # fmt: skip
        self.progress = self.state.progress  # epoch, step, batches into the epoch, seconds: all checkpointed

    def _save(self, name: str) -> None:
        self.state.save(name)
        if name == "last.pt":
            self.clock.checkpoint_written()

    def fit(self) -> dict:
        """Train until the epoch budget, early stopping, the time limit or a stop signal; returns the best validation
        metrics."""
        self.state.resume(self.world_size, self.logger)
        if self.state.already_done:
            log.info("run already finished at epoch %d; its results.json is kept as it is", self.progress.epoch)
            return self.stopping.best_metrics
        if self.rank == 0 and not self.checkpoints.continues_itself(self.state.resumed_from):
            write_run_record(self.output_dir, self.run_config)  # once, when this launch starts the run
        # after resuming, so a requeued job continues the W&B run whose id its checkpoint saved
        record = {**self.run_config, "protocol": self.protocol}  # W&B groups and filters runs by protocol too
        self.progress.wandb_id = self.logger.start(record, self.progress.wandb_id) or self.progress.wandb_id
        if self.state.finished:
            log.info("training already finished (epoch %d); nothing to do", self.progress.epoch)
        with self.clock.signals:
            while not self.state.finished:
                mean_loss = self.train_epoch()  # None: stopped at a step boundary, last.pt holds the position
                decision = self.clock.decision if mean_loss is None else self.clock.check(self.progress.step)
                self.time_limited = decision.time_limit
                if mean_loss is not None or decision.time_limit and not decision.ending_signal:
                    self._log_and_save(mean_loss)
                self.clock.signals.forward(decision.received, decision.ending_signal)  # may end the run here
                if self.time_limited:
                    log.info("time limit of %.1f min reached at %s; testing the best checkpoint", self.clock.minutes,
                             self.progress.where())  # fmt: skip
                    break
        assert_replicas_equal(self.raw_model)  # DDP keeps ranks identical; a difference is a bug, not noise
        return self.stopping.best_metrics

    def _log_and_save(self, mean_loss: float | None) -> None:
        """After an epoch (or the part of one trained before the time limit: its running mean loss and batch count):
        validate when due or at the time limit, log the metrics.jsonl line, write last.pt."""
        p, closing = self.progress, mean_loss is not None
        epoch = p.epoch + closing
        validating = self.time_limited or closing and (epoch % self.eval_every == 0 or epoch == self.num_epochs)
        if closing and validating:
            self._save("last.pt")  # every batch done, the epoch not closed: a kill while validating redoes only that
        if closing:
            record = {"train/loss": mean_loss}
            p.finish_epoch()
        else:
            record = {"train/loss": (p.epoch_loss / p.epoch_batches).item(), "train/epoch_batches": p.epoch_batches}
        record.update({"train/lr": self.scheduler.get_last_lr()[0], "train/seconds": p.train_seconds})
        if validating:
            record.update(self.validate())
            record.update(self.raw_model.diagnostics())  # the residual's health numbers (mHC), not in results
        self.logger.log(record, epoch=p.epoch, step=p.step)
        self._save("last.pt")
        if self.device.type == "cpu":
            release_free_memory()  # the epoch's fragmented heap (seqrec/utils/memory.py)

    def train_epoch(self) -> float | None:
        """Train epoch `epoch + 1` from its batch `epoch_batches` on; returns its mean loss (the caller closes the
        epoch), or None when the step clock stopped it at a step boundary (last.pt then holds the position)."""
        self.model.train()
        p, started = self.progress, time.perf_counter()
        p.epoch_loss = torch.zeros((), device=self.device) if p.epoch_batches == 0 else p.epoch_loss.to(self.device)
        batches = self.sampler.epoch(p.epoch, p.epoch_batches, p.sampler_state)
        if self.device.type == "cuda":  # pinned: `batch.to` below copies without waiting for the GPU
            batches = (batch.pin_memory() for batch in batches)
        batches = prefetch(batches) if self.num_workers > 0 else batches
        hide = not self.show_bars or self.rank != 0
        bar = tqdm(batches, initial=p.epoch_batches, total=self.steps_per_epoch, desc=f"epoch {p.epoch + 1}",
                   leave=False, disable=hide)  # fmt: skip
        for batch in bar:
            p.epoch_loss += self.train_step(batch.to(self.device))
            p.epoch_batches, p.sampler_state = p.epoch_batches + 1, batch.sampler_state
            if not bar.disable and p.epoch_batches % self.log_every_steps == 0:  # the one read of the loss
                bar.set_postfix(loss=f"{p.epoch_loss.item() / p.epoch_batches:.4f}")
            if p.epoch_batches == self.steps_per_epoch or not self.clock.due(p.step):
                continue  # the epoch's end is checked by `fit`, for every epoch
            decision = self.clock.check(p.step)
            if decision.checkpoint or decision.stop:
                p.train_seconds += time.perf_counter() - started
                self._check_finite((p.epoch_loss / p.epoch_batches).item())
                self._save("last.pt")
                started = time.perf_counter()
            if decision.stop:
                bar.close()
                batches.close()  # a prefetch thread ends too
                return None
        mean = (p.epoch_loss / max(self.steps_per_epoch, 1)).item()
        p.train_seconds += time.perf_counter() - started
        self._check_finite(mean)
        return mean

    def _check_finite(self, mean_loss: float) -> None:
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss became {mean_loss} in epoch {self.progress.epoch + 1}; stopped, the last good checkpoint is "
                f"{self.checkpoints.last} ({self.state.last_saved}); try a lower optimizer.lr (e.g. 0.0005) "
                "or trainer.grad_clip=1.0"
            )

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step on a batch already on the device; returns the loss as a device tensor. Nothing here
        waits for the GPU (no .item(), no data-dependent shape), except float16's GradScaler inf check."""
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
        self.progress.step += 1
        return loss.detach().float()

    def _forward_loss(self, seq, times, time_scale, pos, neg) -> torch.Tensor:
        """The batch's mean loss: the part of a step that trainer.compile compiles (the backward follows it)."""
        return self.loss(self.model(seq, times, time_scale), self.raw_model.head, pos, neg)

    def validate(self) -> dict:
        start = time.perf_counter()
        with self.clock.signals.at_once():  # it may outlast a preemption warning (seqrec/train/stop_signals.py)
            metrics = self.evaluator.evaluate(self.raw_model, "valid", self.device)
        self.progress.eval_seconds += time.perf_counter() - start
        s = self.stopping
        if s.monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={s.monitor} is not a validation metric; choose one of {sorted(metrics)}"
            )
        outcome = s.observe(metrics, self.progress.epoch)
        if outcome == "best":
            self._save("best.pt")
        elif outcome == "decay":
            self.state.apply_lr_decay()
        shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "@10" in k)
        log.info("%s  %s  (best %.4f at epoch %d)", self.progress.where(), shown, s.best_value, s.best_epoch)
        return metrics

    @functools.cached_property
    def protocol(self) -> dict:
        """The evaluation protocol's fingerprint (data, split, targets, metrics): which runs may be compared.
        Computed once: it hashes the whole dataset."""
        return protocol_fingerprint(self.evaluator.data, self.evaluator)

    def test(self) -> dict:
        """Evaluate the test split once, on the best (validation-selected) checkpoint; write results.json.
        A finished run relaunched is not tested again: its results.json is read and returned as it is."""
        if self.state.already_done:
            return self.state.stored_results()
        if self.checkpoints.best.exists():
            self.raw_model.load_state_dict(load_checkpoint(self.checkpoints.best)["model"])
        start = time.perf_counter()
        test_metrics = self.evaluator.evaluate(self.raw_model, "test", self.device)
        self.evaluator.write_test_ranks(self.output_dir)  # for tests paired over users (seqrec.results)
        p, s = self.progress, self.stopping
        p.eval_seconds += time.perf_counter() - start
        results = dict(best_epoch=s.best_epoch, epochs_run=p.epoch, stopped_early=s.stopped_early,
                       time_limited=self.time_limited, train_seconds=round(p.train_seconds, 3),
                       eval_seconds=round(p.eval_seconds, 3), monitor=s.monitor, steps=p.step)  # fmt: skip
        results |= {**s.best_metrics, **test_metrics, "protocol": self.protocol, "config": self.run_config}
        if self.rank == 0:
            write_json(results, self.output_dir / "results.json")
        self.logger.summary({k: v for k, v in results.items() if k not in ("config", "protocol")})
        shown = "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@10" in k)
        log.info("test (best epoch %d): %s", s.best_epoch, shown)
        return results
