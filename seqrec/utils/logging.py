"""The one metrics sink: stdout/train.log, `metrics.jsonl` and optionally Weights & Biases (rank 0 only).

W&B never decides whether a run succeeds: it is offline unless the user chose online; an online start without a key
or without an answering server (probed in at most 5 s) or that fails within `init_timeout` records the same run
offline, with one warning that names the `wandb sync` command; any W&B error after the start turns W&B off with one
warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from seqrec.errors import DataError
from seqrec.utils.rules import NON_NEGATIVE

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


class MetricLogger:
    """Writes one JSON object per call to `<output_dir>/metrics.jsonl` and, with `wandb=true`, to a W&B run.

    Args:
        output_dir: the run directory; W&B files go to `<output_dir>/wandb/`.
        wandb: also log to Weights & Biases.
        rank: only rank 0 writes.
        project, entity: the W&B project and entity (None: the account's default entity).
        mode: "offline" (default: files only, `wandb sync` uploads later), "online" or "disabled".
        group: W&B group; the jobs of one sweep share it (`${sweep_name}`).
        name: W&B display name (`${hydra:job.override_dirname}`: the overrides); "" lets W&B pick one.
        tags: W&B tags.
        init_timeout: seconds an online start may take before falling back to offline.
    """

    RULES = {"init_timeout": NON_NEGATIVE}

    def __init__(
        self,
        *,
        output_dir: str,
        wandb: bool = False,
        rank: int = 0,
        project: str = "seqrec",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        init_timeout: float = 60.0,
    ):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.rank = rank
        self.use_wandb = bool(wandb)
        self.project, self.entity, self.group, self.name = project, entity, group or None, name or None
        self.tags = list(tags or [])
        self.mode = (mode or "offline").strip().lower()  # WANDB_MODE="" means the default, not an error
        self.init_timeout = float(init_timeout)
        self.wandb_run = None
        self.init_failure = ""  # why the last wandb.init failed

    @property
    def active(self) -> bool:
        return self.rank == 0

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, config: dict | None = None, run_id: str | None = None) -> str | None:
        """Open the sinks; returns the W&B run id to store in checkpoints (None without W&B).

        Args:
            config: the resolved run config, shown as the W&B run's config.
            run_id: the id saved in the checkpoint being resumed: the same W&B run continues (`resume="allow"`).
        """
        if not (self.active and self.use_wandb) or self.wandb_run is not None:
            return self.wandb_run.id if self.wandb_run is not None else None
        if self.mode not in WANDB_MODES:
            log.warning("logger.mode=%s is not one of %s; logging to W&B offline", self.mode, "/".join(WANDB_MODES))
            self.mode = "offline"
        if self.mode == "disabled":
            return run_id
        try:
            import wandb
        except ImportError:
            log.warning(
                "logger=wandb but the wandb package is not installed (pip install wandb); metrics go to "
                "metrics.jsonl only"
            )
            return run_id
        from wandb.sdk.lib.runid import generate_id

        run_id = run_id or generate_id()
        mode, why_offline = self.mode, None
        if mode == "online":
            why_offline = _why_not_online(wandb)
            mode = "offline" if why_offline else "online"
        self.wandb_run = self._init(wandb, config, run_id, mode)
        if self.wandb_run is None and mode == "online":
            why_offline, mode = f"the online start failed ({self.init_failure})", "offline"
            # wandb's service still holds the failed run's id ("run ID is in use"): restart it, then the same id
            # starts offline, so a later `wandb sync` uploads it as the run it was meant to be
            _teardown(wandb)
            self.wandb_run = self._init(wandb, config, run_id, mode)
        if self.wandb_run is None:
            return run_id
        try:
            self.wandb_run.define_metric("epoch")
            self.wandb_run.define_metric("*", step_metric="epoch")  # x-axis = epoch, so a resume may re-log an epoch
        except Exception as e:  # noqa: BLE001 - cosmetic, never fatal
            log.debug("wandb define_metric failed: %s", e)
        self._announce(run_id, mode, why_offline)
        return run_id

    def _announce(self, run_id: str, mode: str, why_offline: str | None) -> None:
        """One line: the online run's URL, or where the offline run is and the command that uploads it."""
        if mode == "online":
            log.info("W&B run %s: %s", run_id, getattr(self.wandb_run, "url", ""))
            return
        sync = f"wandb sync {Path(self.wandb_run.dir).parent}"
        if why_offline:
            log.warning(
                "logger.mode=online but %s: W&B run %s is recorded offline; upload it with: %s",
                why_offline,
                run_id,
                sync,
            )
        else:
            log.info("W&B offline run %s (group %s); upload it later with: %s", run_id, self.group, sync)

    def _init(self, wandb, config, run_id: str, mode: str):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            return wandb.init(
                project=self.project,
                entity=self.entity,
                group=self.group,
                name=self.name,
                tags=self.tags or None,
                config=config,
                id=run_id,
                resume="allow",
                dir=str(self.output_dir),
                mode=mode,
                settings=wandb.Settings(init_timeout=self.init_timeout, finish_timeout=self.init_timeout),
            )
        except Exception as e:  # noqa: BLE001 - W&B must never end the run
            self.init_failure = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if mode != "online":  # an online failure is told once, with the offline fallback (see start)
                log.warning("wandb.init (%s) failed: %s", mode, self.init_failure)
            return None

    def close(self) -> None:
        """Flush and close every sink (`wandb.finish`, with exit code 1 while an exception is propagating);
        safe to call more than once."""
        run, self.wandb_run = self.wandb_run, None
        if run is None:
            return
        failed = sys.exc_info()[0] is not None  # called from run()'s `finally`
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb.finish failed: %s", e)

    # --- metrics -------------------------------------------------------------------------------------
    def truncate_after(self, epoch: int) -> None:
        """Drop lines of epochs after `epoch` (written by a killed run after its last checkpoint), and a last line a
        kill cut in half (with a warning); any other unreadable line is an error naming it."""
        if not self.active or not self.path.exists():
            return
        text = self.path.read_text()
        kept = [ln for ln in self._readable_lines(text.splitlines()) if json.loads(ln).get("epoch", 0) <= epoch]
        new_text = "".join(ln + "\n" for ln in kept)
        if new_text != text:
            self.path.write_text(new_text)

    def _readable_lines(self, lines: list[str]) -> list[str]:
        numbered = [(number, ln) for number, ln in enumerate(lines, 1) if ln.strip()]
        for position, (number, line) in enumerate(numbered):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                if position < len(numbered) - 1:
                    raise DataError(f"{self.path}:{number}: not a JSON line; repair or remove it to resume") from None
                log.warning("%s:%d: dropping a last line cut short by a kill (%r)", self.path, number, line[:60])
                numbered.pop()
        return [ln for _, ln in numbered]

    def log(self, metrics: dict, epoch: int, step: int) -> None:
        if not self.active:
            return
        record = {"epoch": epoch, "step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._wandb_call("log", {k: v for k, v in record.items() if v is not None})

    def summary(self, results: dict) -> None:
        """Final results (best checkpoint's validation and test metrics) and the best checkpoint's path."""
        if not self.active or self.wandb_run is None:
            return
        best = self.output_dir / "checkpoints" / "best.pt"
        extra = {
            "best_checkpoint": str(best.resolve()) if best.exists() else None,
            "run_dir": str(self.output_dir.resolve()),
        }
        self._wandb_call("summary", {**{k: _clean(v) for k, v in results.items()}, **extra})

    def _wandb_call(self, what: str, payload: dict) -> None:
        if self.wandb_run is None:
            return
        try:
            if what == "log":
                self.wandb_run.log(payload)
            else:
                self.wandb_run.summary.update(payload)
        except Exception as e:  # noqa: BLE001 - W&B must never end the run
            log.warning(
                "W&B %s failed (%s); W&B logging is off for the rest of this run, metrics.jsonl continues", what, e
            )
            self.close()


PROBE_TIMEOUT_S = 5.0  # an unreachable W&B server costs this, not wandb's init_timeout


def _why_not_online(wandb) -> str | None:
    """Why an online start cannot work here (no key, server unreachable), or None: checked in seconds, before
    wandb.init would spend its whole init_timeout finding out."""
    if not _has_api_key(wandb):
        return "no W&B API key is configured (wandb login, or WANDB_API_KEY)"
    try:
        settings = wandb.setup().settings
        # the variable first: wandb's settings object is made once per process and keeps its first base_url
        url = os.environ.get("WANDB_BASE_URL") or settings.base_url
        proxy = settings.https_proxy or settings.http_proxy
    except Exception:  # noqa: BLE001 - leave the decision to wandb.init
        return None
    if not server_answers(url, PROBE_TIMEOUT_S, proxy):
        return f"{url} does not answer within {PROBE_TIMEOUT_S:.0f} s"
    return None


def server_answers(url: str, timeout_s: float, proxy: str | None = None) -> bool:
    """Whether an HTTP request to `url` gets any HTTP response (an error status counts) within `timeout_s`.

    Over HTTP, not a bare TCP connect, so that a proxy or firewall that accepts connections but forwards nothing
    counts as unreachable. In a thread because name lookup is not bounded by a socket timeout. `proxy` (W&B's own
    setting) overrides HTTP(S)_PROXY, which urllib honours by itself.
    """
    answered: list[bool] = []

    def ask() -> None:
        handlers = [urllib.request.ProxyHandler({"http": proxy, "https": proxy})] if proxy else []
        try:
            urllib.request.build_opener(*handlers).open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
            answered.append(True)
        except urllib.error.HTTPError:  # 401, 404, 500...: a server is there
            answered.append(True)
        except (OSError, ValueError):  # refused, unreachable, unknown host, timed out, not a URL
            pass

    probe = threading.Thread(target=ask, name="seqrec-wandb-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(answered)


def _teardown(wandb) -> None:
    try:
        wandb.teardown()
    except Exception as e:  # noqa: BLE001
        log.debug("wandb.teardown failed: %s", e)


def _has_api_key(wandb) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001
        return False


def _clean(v):
    v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v
