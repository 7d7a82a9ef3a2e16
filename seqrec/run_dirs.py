"""Run directories read as data, for the comparison tools (`seqrec.results`, `seqrec.compare`) and `seqrec.predict`.

A run directory holds its record (`run.json`, or `.hydra/overrides.yaml` for runs made before run.json existed) and
`metrics.jsonl` or `results.json`; sweep directories are searched for them.

Where a run's settings come from: `run.json`, written once when the run first launched and never rewritten, gives
its config, overrides and config-group choices. Runs made before it existed fall back to `results.json["config"]`
and then to `.hydra/overrides.yaml`, `.hydra/hydra.yaml` and `.hydra/config.yaml`, which a later command in the same
directory (even a refused one) may have rewritten. Every file is read as data (JSON, or YAML through OmegaConf's safe
loader); nothing a run directory names is imported or instantiated.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from seqrec.errors import SeqrecError

RECORD = "run.json"  # a run's authoritative record: config, overrides and choices as of its first launch
LEGACY_OVERRIDES = Path(".hydra") / "overrides.yaml"  # the record of runs made before run.json
RUN_MARKERS = ("results.json", "metrics.jsonl")
# overrides that do not change the experiment (hydra.job.config.override_dirname.exclude_keys in conf/train.yaml, and
# where the outputs go)
IGNORED_OVERRIDES = {"logger", "trainer.progress", "trainer.num_workers", "trainer.resume", "trainer.log_every_steps"}
IGNORED_OVERRIDES |= {"sweep_name", "trainer.output_dir", "logger.output_dir", "trainer.checkpoint_every_min"}
UNRECORDED = "unrecorded"  # the protocol of runs made before results.json recorded it


class CompareError(SeqrecError):
    """A user error: reported as one line, exit status 1."""


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    results: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    _composed: tuple | None = field(default=None, repr=False)  # (group choices, config), read on first need

    def setting(self, key: str) -> str:
        """The run's value of `key`: its override, else what its config resolved to (so a run that left
        sampler.history at its default reads `last`, not blank), else "" when the run directory cannot tell."""
        if key in self.overrides:
            return self.overrides[key]
        if self._composed is None:
            self._composed = read_settings(self.path)
        choices, config = self._composed
        if key in choices:
            return fmt_setting(choices[key])
        from omegaconf import OmegaConf

        try:  # a recorded config is plain resolved data; a legacy DictConfig resolves the key on access
            value = _lookup(config, key)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        except Exception:  # noqa: BLE001 - ${hydra:...} and ${now:...} only resolve inside Hydra
            return ""
        return "" if value is None else fmt_setting(value)

    @property
    def finished(self) -> bool:
        return bool(self.results)

    @property
    def protocol(self) -> dict | None:
        """results.json["protocol"] (seqrec.fingerprint), None for runs unfinished or made before it existed."""
        protocol = self.results.get("protocol")
        return protocol if isinstance(protocol, dict) and "id" in protocol else None

    @property
    def protocol_id(self) -> str:
        return self.protocol["id"] if self.protocol else UNRECORDED

    def metrics(self, metric: str) -> dict:
        """results.json if the run finished, else the epoch of metrics.jsonl with the best `metric` so far
        (validation metrics only appear on evaluation epochs)."""
        if self.results:
            return self.results
        evaluated = [r for r in self.history if number(r.get(metric)) is not None]
        return max(evaluated, key=lambda r: r[metric]) if evaluated else {}


# --------------------------------------------------------------------------------------------- discovery
def is_run_dir(path: Path) -> bool:
    has_record = (path / RECORD).is_file() or (path / LEGACY_OVERRIDES).is_file()
    return has_record and any((path / m).is_file() for m in RUN_MARKERS)


def find_runs(paths: list[str]) -> list[Run]:
    """Every run directory given or under the given directories, each read once (sorted by path)."""
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CompareError(f"{p}: no such directory")
        if not path.is_dir():
            raise CompareError(f"{p}: not a directory (give a run or sweep directory)")
        if is_run_dir(path):
            found[path.resolve()] = None
            continue
        # folders holding a run record (run.json, or a legacy .hydra/overrides.yaml)
        candidates = {f.parent for f in path.rglob(RECORD)}
        candidates |= {f.parent.parent for f in path.rglob(str(LEGACY_OVERRIDES))}
        runs = sorted(c for c in candidates if is_run_dir(c))
        for c in sorted(candidates - set(runs)):
            print(
                f"note: {c}: no metrics.jsonl or results.json (failed before its first epoch?); skipped",
                file=sys.stderr,
            )
        if not runs:
            raise CompareError(
                f"{p}: no run directories found (a run directory holds run.json, or .hydra/overrides.yaml for "
                "older runs, and metrics.jsonl or results.json)"
            )
        found.update((r.resolve(), None) for r in runs)
    return [read_run(p) for p in found]


def read_run(path: Path) -> Run:
    overrides = {}
    for line in read_overrides(path):
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if key not in IGNORED_OVERRIDES and not key.startswith("hydra"):
            overrides[key] = value
    results = read_json(path / "results.json") if (path / "results.json").is_file() else {}
    history = []
    lines = (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").is_file() else []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines):  # a half-written last line (a run killed mid-write) is skipped
                    raise CompareError(f"{path / 'metrics.jsonl'}:{i}: not valid JSON") from None
    return Run(path, overrides, results, history)


# --------------------------------------------------------------------------------------------- run records
def read_json(file: Path) -> dict:
    """A JSON object from `file`, or CompareError naming the file."""
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{file}: not readable as JSON ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(value, dict):
        raise CompareError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_record(path: Path) -> dict | None:
    """The run's `run.json`, checked to have the fields tools read; None for a run made before run.json existed."""
    file = path / RECORD
    if not file.is_file():
        return None
    record = read_json(file)
    for key, kind in (("config", dict), ("overrides", list), ("choices", dict)):
        if not isinstance(record.get(key), kind):
            raise CompareError(f"{file}: expected '{key}' to be a JSON {kind.__name__.replace('dict', 'object')}")
    if not all(isinstance(o, str) for o in record["overrides"]):
        raise CompareError(f"{file}: expected 'overrides' to be a list of strings")
    return record


def read_overrides(path: Path) -> list[str]:
    """The run's command-line overrides: run.json["overrides"], else the legacy .hydra/overrides.yaml."""
    record = read_record(path)
    if record is not None:
        return record["overrides"]
    legacy = path / LEGACY_OVERRIDES
    return [str(x) for x in _read_yaml(legacy) or []] if legacy.is_file() else []


def read_config(path: Path) -> tuple[object, Path | None]:
    """(the run's config, the file it came from): run.json["config"] (plain dict), else results.json["config"],
    else the legacy `.hydra/config.yaml` (a DictConfig, unresolved); (None, None) if the directory has none."""
    record = read_record(path)
    if record is not None:
        return record["config"], path / RECORD
    results = path / "results.json"
    config = read_json(results).get("config") if results.is_file() else None
    if isinstance(config, dict):
        return config, results
    legacy = path / ".hydra" / "config.yaml"
    return (_read_yaml(legacy, container=False), legacy) if legacy.is_file() else (None, None)


def read_settings(path: Path) -> tuple[dict, object]:
    """({config group: choice}, config) for labelling a run: the config is a plain dict when recorded (run.json,
    results.json), a DictConfig from a legacy .hydra/config.yaml; empty / None when the directory does not say (a
    legacy run copied without its .hydra folder, or an unreadable file: labels then use overrides)."""
    record = read_record(path)
    if record is not None:
        return dict(record["choices"]), record["config"]
    choices, config = {}, None
    try:
        if (path / ".hydra" / "hydra.yaml").is_file():
            choices = _lookup(_read_yaml(path / ".hydra" / "hydra.yaml"), "hydra.runtime.choices") or {}
        config, _ = read_config(path)
    except Exception:  # noqa: BLE001 - labels fall back to the overrides alone
        pass
    return dict(choices), config


def _read_yaml(file: Path, container: bool = True):
    """YAML as data, through a safe loader: plain containers, or (container=False) OmegaConf's DictConfig, whose
    interpolations resolve on access."""
    try:
        if container:
            import yaml  # (OmegaConf's own parser; plain containers need no DictConfig, which is slow to build)

            return yaml.safe_load(file.read_text())
        from omegaconf import OmegaConf

        return OmegaConf.load(file)
    except Exception as e:  # noqa: BLE001 - yaml and omegaconf raise several types
        raise CompareError(f"{file}: not readable YAML ({str(e).splitlines()[0][:160]})") from None


def _lookup(config, key: str):
    """config["a"]["b"] for key "a.b" (a dict or a DictConfig); None where a level is missing."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def fmt_setting(v) -> str:
    """A config value as Hydra writes it in an override (true, null, [1,2])."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(fmt_setting(x) for x in v) + "]"
    return str(v)


def number(v) -> float | None:
    """v as a finite float; None for anything else (missing, bool, text, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None
