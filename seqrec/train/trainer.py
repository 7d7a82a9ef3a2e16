"""The training loop: Adam with warm-up and step decay, evaluation, early stopping and resumable checkpoints.

Research hygiene: the best checkpoint is chosen on validation only and the test split is evaluated once, on
that checkpoint. Every epoch ends with an atomic `last.pt` holding everything needed to continue exactly
(model, optimizer, scheduler, scaler, RNG, early-stopping state), so `resume=auto` after a kill reaches the
same result as an unbroken run.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from seqrec.errors import CheckpointError, ConfigError, TrainingError
from seqrec.train.checkpoint import load_checkpoint, save_checkpoint, write_json
from seqrec.train.distributed import assert_replicas_equal
from seqrec.train.sampler import prefetch
from seqrec.utils.memory import release_free_memory, reuse_freed_memory

log = logging.getLogger(__name__)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device}: torch sees no CUDA device; use hardware=cpu")
    return torch.device(device)


RESUME_MUST_MATCH = ("model", "residual", "loss", "dataset", "seed")  # what a resumed run may not change
# ...except these, which choose how the same maths is computed (a resumed job may land where no compiler exists)
RESUME_MAY_CHANGE = ("loss.chunk_tokens", "kernels", "residual.kernel", "residual.compile")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_differences(saved: dict, current: dict) -> list[str]:
    """'path: old -> new' for every setting in RESUME_MUST_MATCH that differs (empty when either is unknown)."""
    if not saved or not current:
        return []
    old = _flatten({k: saved.get(k) for k in RESUME_MUST_MATCH})
    new = _flatten({k: current.get(k) for k in RESUME_MUST_MATCH})
    keys = sorted((set(old) | set(new)) - set(RESUME_MAY_CHANGE))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Trainer:
    """Fits a model with a sampler and a loss, evaluates with an Evaluator, logs to a MetricLogger.

    Args (the keys of the `trainer:` config node):
        output_dir: run directory; checkpoints go to `<output_dir>/checkpoints/`.
        num_epochs: epoch budget.
        batch_size: global batch size (the sampler does the batching; kept here for the record).
        lr, betas: Adam.
        lr_decay_step, lr_decay_rate: lr *= rate every `lr_decay_step` epochs.
        lr_schedule: "constant" (only the step decay above) or "cosine": also anneal the lr along half a cosine
            from its peak to 0 at the end of `num_epochs`, so set `num_epochs` to the budget. A constant Adam lr
            leaves the weights hopping around a plateau and the chosen epoch is partly luck; annealing settles
            them.
        warmup_steps: linear warm-up over the first steps.
        l2_emb: l2_emb * Σ w² over every embedding table.
        grad_clip: max global gradient norm (0 = off).
        eval_every: validate every N epochs (and after the last).
        patience: stop after N validations without improvement of `monitor` (0 = never).
        plateau_decays, plateau_factor: the first `plateau_decays` times patience runs out, multiply the lr by
            `plateau_factor` and carry on instead of stopping (reduce-on-plateau, then early stopping). A run
            that stopped early and is resumed with decays left continues at the reduced lr, exactly as an
            unbroken run with this setting would have.
        monitor: validation metric key, e.g. "val/ndcg@10" (higher is better).
        resume: "auto" (continue from <output_dir>/checkpoints/last.pt if present), "never", or a path.
        num_workers: 0 = build batches inline, >= 1 = in a background thread.
        devices: number of processes (handled by the launcher; the trainer reads rank/world from torch.distributed).
        device: "auto" | "cpu" | "cuda".
        amp, amp_dtype: autocast with bfloat16 or float16 (+ GradScaler).
        log_every_steps: train-loss logging interval.
        progress: tqdm progress bars.
        deterministic: use torch's deterministic kernels (bitwise-reproducible runs and resumes; on the CPU
            the cost is small, on GPUs it can be large).
        time_limit_min: stop training after this many wall-clock minutes of this process (0 = no limit), validate
            if the last epoch was not validated, then test the best checkpoint as usual. For fixed compute
            budgets (a lent GPU, a queue limit); results then depend on the machine's speed, so results.json
            says `time_limited: true`. A resumed run gets a fresh limit.
    """

    def __init__(
        self,
        model: nn.Module,
        sampler,
        evaluator,
        loss,
        logger,
        *,
        output_dir: str,
        num_epochs: int = 1000,
        batch_size: int = 128,
        lr: float = 0.001,
        betas: list[float] = (0.9, 0.98),
        lr_decay_step: int = 1000,
        lr_decay_rate: float = 0.95,
        lr_schedule: str = "constant",
        warmup_steps: int = 100,
        l2_emb: float = 0.0,
        grad_clip: float = 0.0,
        eval_every: int = 5,
        patience: int = 10,
        plateau_decays: int = 0,
        plateau_factor: float = 0.1,
        monitor: str = "val/ndcg@10",
        resume: str = "auto",
        num_workers: int = 1,
        devices: int = 1,
        device: str = "auto",
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        log_every_steps: int = 100,
        progress: bool = True,
        deterministic: bool = True,
        time_limit_min: float = 0.0,
        run_config: dict | None = None,
    ):
        self.sampler, self.evaluator, self.loss, self.logger = sampler, evaluator, loss, logger
        self.output_dir = Path(output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.num_epochs, self.lr_decay_step, self.lr_decay_rate = num_epochs, lr_decay_step, lr_decay_rate
        self.warmup_steps, self.l2_emb, self.grad_clip = warmup_steps, l2_emb, grad_clip
        self.eval_every, self.patience, self.monitor, self.resume = eval_every, patience, monitor, str(resume)
        self.plateau_decays, self.plateau_factor = plateau_decays, plateau_factor
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"trainer.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.num_workers, self.log_every_steps, self.progress = num_workers, log_every_steps, progress
        self.run_config = run_config or {}
        self.time_limit_s = 60.0 * time_limit_min
        self.started_at = time.perf_counter()
        self.time_limited = False  # not checkpointed: a resumed run continues under its own, fresh limit
        # some CPU kernels (e.g. the embedding backward's scatter-add) otherwise sum in thread-dependent order
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every torch.empty costs ~10 %
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            reuse_freed_memory()  # activations' pages are reused between steps instead of faulted in again
        self.raw_model = model.to(self.device)
        self.model = self._wrap_ddp(self.raw_model)
        self.amp_dtype = AMP_DTYPES[amp_dtype] if amp else None
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=lr, betas=tuple(betas))
        self.steps_per_epoch = len(sampler)
        self.lr_decays = 0  # plateau decays so far (checkpointed; before the scheduler, whose factor reads it)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.embedding_tables = [m.weight for m in self.raw_model.modules() if isinstance(m, nn.Embedding)]
        # state that checkpoints carry
        self.epoch = 0  # completed epochs
        self.step = 0
        self.best_value = -math.inf
        self.best_epoch = 0
        self.best_metrics: dict = {}
        self.bad_evals = 0
        self.stopped_early = False
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.wandb_id = None

    # --- setup ---------------------------------------------------------------------------------------
    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        epoch = step // max(self.steps_per_epoch, 1)
        factor = warm * self.lr_decay_rate ** (epoch // self.lr_decay_step) * self.plateau_factor**self.lr_decays
        if self.lr_schedule == "cosine":
            progress = min(1.0, step / max(self.num_epochs * self.steps_per_epoch, 1))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- checkpoints ---------------------------------------------------------------------------------
    def _rng_states(self) -> list[dict]:
        """Every rank's RNG state (dropout streams differ per rank), gathered so rank 0 can save them all."""
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if self.world_size == 1:
            return [mine]
        states = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def state_dict(self, rng_states: list[dict] | None = None) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "bad_evals": self.bad_evals,
            "lr_decays": self.lr_decays,
            "stopped_early": self.stopped_early,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "rng": rng_states if rng_states is not None else self._rng_states(),
            "wandb_id": self.wandb_id,
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
        for key in (
            "epoch",
            "step",
            "best_value",
            "best_epoch",
            "best_metrics",
            "bad_evals",
            "stopped_early",
            "train_seconds",
            "eval_seconds",
            "wandb_id",
        ):
            setattr(self, key, state[key])
        self.lr_decays = state.get("lr_decays", 0)  # checkpoints from before plateau decays had none
        rng = state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _save(self, name: str) -> None:
        rng_states = self._rng_states()  # a collective: every rank takes part
        if self.rank == 0:
            save_checkpoint(self.state_dict(rng_states), self.ckpt_dir / name)
        if self.world_size > 1:
            dist.barrier()

    def resume_path(self) -> Path | None:
        """The checkpoint to continue from, per `resume`; refuses to silently overwrite an earlier run."""
        last = self.ckpt_dir / "last.pt"
        if self.resume == "auto":
            return last if last.exists() else None
        if self.resume in ("never", "none", "None", ""):
            if last.exists():
                raise CheckpointError(
                    f"{self.output_dir} already holds a run (checkpoints/last.pt); use trainer.resume=auto to continue "
                    "it or another hydra.run.dir; refusing to overwrite it"
                )
            return None
        path = Path(self.resume)
        return path / "checkpoints" / "last.pt" if path.is_dir() else path

    def maybe_resume(self) -> None:
        path = self.resume_path()
        if path is None:
            return
        state = load_checkpoint(path)
        changed = config_differences(state.get("config") or {}, self.run_config)
        if changed:
            raise CheckpointError(
                f"{path} was trained with a different setup ({'; '.join(changed[:5])}); "
                "resume it with its own settings or start a new run directory"
            )
        self.load_state_dict(state, path)
        self._warn_if_the_schedule_moved((state.get("config") or {}).get("trainer") or {})
        self.logger.truncate_after(self.epoch)
        if self.stopped_early:  # decided again under this config's rule: more patience or a plateau decay continues
            self.stopped_early = False
            self._on_patience()
        log.info(
            "resumed from %s at epoch %d (best %s=%.4f at epoch %d)",
            path,
            self.epoch,
            self.monitor,
            self.best_value,
            self.best_epoch,
        )

    def _warn_if_the_schedule_moved(self, saved: dict) -> None:
        """A cosine schedule ends at `num_epochs`: resuming under another budget (or another schedule) bends the lr
        curve mid-run. Allowed, as more epochs are a common wish, but said out loud."""
        old = (saved.get("lr_schedule", "constant"), saved.get("num_epochs", self.num_epochs))
        if "cosine" in (old[0], self.lr_schedule) and old != (self.lr_schedule, self.num_epochs):
            log.warning(
                "resuming a run trained with lr_schedule=%s over %s epochs under lr_schedule=%s over %d: the lr "
                "curve changes from here on (the cosine ends at the new trainer.num_epochs)",
                *old,
                self.lr_schedule,
                self.num_epochs,
            )

    # --- training ------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.stopped_early or self.epoch >= self.num_epochs

    def fit(self) -> dict:
        """Train until the epoch budget or early stopping; returns the best validation metrics."""
        self.maybe_resume()
        # after resuming, so a requeued job continues the W&B run whose id its checkpoint saved
        self.wandb_id = self.logger.start(self.run_config, self.wandb_id) or self.wandb_id
        if self.finished:
            log.info("training already finished (epoch %d); nothing to do", self.epoch)
        while not self.finished:
            loss = self.train_epoch()
            self.epoch += 1
            record = {
                "train/loss": loss,
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/seconds": self.train_seconds,
            }
            self.time_limited = self._out_of_time()
            if self.epoch % self.eval_every == 0 or self.epoch == self.num_epochs or self.time_limited:
                record.update(self.validate())
                record.update(self.residual_diagnostics())
            self.logger.log(record, epoch=self.epoch, step=self.step)
            self._save("last.pt")
            if self.device.type == "cpu":
                release_free_memory()  # the epoch's fragmented heap (seqrec/utils/memory.py)
            if self.time_limited:
                log.info(
                    "time limit of %.1f min reached after epoch %d; testing the best checkpoint",
                    self.time_limit_s / 60,
                    self.epoch,
                )
                break
        assert_replicas_equal(self.raw_model)  # DDP keeps ranks identical; a difference is a bug, not noise
        return self.best_metrics

    def _out_of_time(self) -> bool:
        """Whether trainer.time_limit_min has passed, decided by rank 0 so that every rank stops together."""
        if self.time_limit_s <= 0:
            return False
        flag = torch.tensor([time.perf_counter() - self.started_at > self.time_limit_s], dtype=torch.int32)
        if self.world_size > 1:
            flag = flag.to(self.device)
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def train_epoch(self) -> float:
        self.model.train()
        start = time.perf_counter()
        batches = self.sampler.epoch(self.epoch)
        if self.num_workers > 0:
            batches = prefetch(batches)
        bar = tqdm(
            batches,
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}",
            leave=False,
            disable=not self.progress or self.rank != 0,
        )
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(bar):
            loss = self.train_step(batch.to(self.device))
            total += loss
            if (i + 1) % self.log_every_steps == 0:
                bar.set_postfix(loss=f"{total.item() / (i + 1):.4f}")
        mean = (total / max(self.steps_per_epoch, 1)).item()
        self.train_seconds += time.perf_counter() - start
        if not math.isfinite(mean):
            raise TrainingError(
                f"loss became {mean} in epoch {self.epoch + 1}; stopped, the last good checkpoint is "
                f"{self.ckpt_dir / 'last.pt'} (epoch {self.epoch}); try a lower trainer.lr (e.g. 0.0005) "
                "or trainer.grad_clip=1.0"
            )
        return mean

    def train_step(self, batch) -> torch.Tensor:
        with self._autocast():
            h = self.model(batch.seq, batch.times, batch.time_scale)
            loss = self.loss(h, self.raw_model.item_weight, batch.pos, batch.neg) * batch.loss_weight
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

    def residual_diagnostics(self) -> dict:
        """The residual's health numbers (mHC: H_res row/column sums, gains, gates) from the latest forward pass;
        logged with each validation, not into results.json. Empty for the plain residual."""
        diagnostics = getattr(getattr(self.raw_model, "residual", None), "diagnostics", None)
        return diagnostics(self.raw_model) if diagnostics is not None else {}

    def validate(self) -> dict:
        start = time.perf_counter()
        metrics = self.evaluator.evaluate(self.raw_model, "valid", self.device)
        self.eval_seconds += time.perf_counter() - start
        if self.monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={self.monitor} is not a validation metric; choose one of {sorted(metrics)}"
            )
        value = metrics[self.monitor]
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_metrics, self.bad_evals = value, self.epoch, metrics, 0
            self._save("best.pt")
        else:
            self.bad_evals += 1
            self._on_patience()
        log.info(
            "epoch %d  %s  (best %.4f at epoch %d)",
            self.epoch,
            "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "@10" in k),
            self.best_value,
            self.best_epoch,
        )
        return metrics

    def _on_patience(self) -> None:
        """Once patience runs out: decay the lr while plateau decays are left, else stop early."""
        if not self.patience or self.bad_evals < self.patience:
            return
        if self.lr_decays < self.plateau_decays:
            self.lr_decays += 1
            self.bad_evals, self.stopped_early = 0, False
            # the scheduler already set the next step's lr before this decay; set it again so the decay starts there
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self._lr_factor(self.step)
            log.info(
                "no %s improvement in %d evaluations at epoch %d: lr x %g (decay %d of %d)",
                self.monitor,
                self.patience,
                self.epoch,
                self.plateau_factor,
                self.lr_decays,
                self.plateau_decays,
            )
            return
        self.stopped_early = True
        log.info(
            "early stop at epoch %d: no %s improvement in %d evaluations", self.epoch, self.monitor, self.bad_evals
        )

    def test(self) -> dict:
        """Evaluate the test split once, on the best (validation-selected) checkpoint; write results.json."""
        best = self.ckpt_dir / "best.pt"
        if best.exists():
            self.raw_model.load_state_dict(load_checkpoint(best)["model"])
        start = time.perf_counter()
        test_metrics = self.evaluator.evaluate(self.raw_model, "test", self.device)
        self.eval_seconds += time.perf_counter() - start
        results = {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            "stopped_early": self.stopped_early,
            "time_limited": self.time_limited,
            "train_seconds": round(self.train_seconds, 3),
            "eval_seconds": round(self.eval_seconds, 3),
            "monitor": self.monitor,
            "steps": self.step,
            **self.best_metrics,
            **test_metrics,
        }
        if self.rank == 0:
            write_json(results, self.output_dir / "results.json")
        self.logger.summary(results)
        log.info(
            "test (best epoch %d): %s",
            self.best_epoch,
            "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@10" in k),
        )
        return results
