"""Which settings a resumed run may change: a resume must never silently give a different run.

A run is resumed (`trainer.resume=auto` on its directory, or `trainer.resume=<checkpoint>`) under the config of the
new command. Every setting is compared with the one the run was trained under, key by key:

| keys                                                        | on resume | why                                     |
|-------------------------------------------------------------|-----------|-----------------------------------------|
| every key not listed below, among them: `model.*`,          | refused   | they change the optimisation trajectory |
| `residual.*`, `loss.*`, `dataset.*`, `seed`, `sampler.*`    |           | (maths, data, batches, step sizes) or   |
| (batch_size, history), `eval.*` (protocol, ks, negatives,   |           | what "best" means: the resumed run      |
| filter_seen), `optimized_metric`, `trainer.monitor`,        |           | would be neither the old run nor a new  |
| `optimizer.*` (lr, betas, eps, weight_decay),               |           | one                                     |
| `schedule.*` (warmup_steps, decay_*, constant|cosine),      |           |                                         |
| `trainer.plateau_factor`, `l2_emb`, `grad_clip`, `devices`, |           |                                         |
| `device`, `amp`, `amp_dtype`, `deterministic`; the number   |           |                                         |
| of processes (checked against the per-rank RNG states)      |           |                                         |
| `trainer.num_epochs`                                        | allowed   | the budget (a cosine schedule bends;    |
|                                                             |           | a warning says so)                      |
| `trainer.patience`, `trainer.plateau_decays`,               | allowed   | when to stop or decay, decided again at |
| `trainer.time_limit_min`, `trainer.eval_every`              |           | the resume as an unbroken run would     |
| `trainer.progress`, `trainer.num_workers`,                  | allowed   | display, prefetching, bookkeeping       |
| `trainer.log_every_steps`, `trainer.resume`,                |           |                                         |
| `trainer.checkpoint_every_min`, `trainer.output_dir`,       |           |                                         |
| `logger.*`, `sweep_name`                                    |           |                                         |
| `kernels`, `residual.kernel`, `residual.compile`,           | allowed   | how the same maths is computed (a       |
| `loss.chunk_tokens`, `eval.batch_size`, `eval.item_chunk`, |           | requeued job may land where no compiler |
| `dataset.cache`, `distributed.*`, `slurm.*`,                |           | exists)                                 |
| `trainer.compile`, `sampler.length_buckets`                 |           |                                         |

A key added to seqrec after a run was recorded (e.g. `dataset.split`) counts, for that run, as the value that does
what the code did before the key existed (`ADDED_SINCE`): the run resumes when the new key holds that value and is
refused in one line otherwise (`dataset.duplicates: 'keep' -> 'drop'`: add `dataset.duplicates=keep`).

Runs recorded before the optimizer and the schedule became config groups kept Adam's and the schedule's keys under
`trainer.` (`trainer.lr`, `betas`, `warmup_steps`, `lr_decay_step`, `lr_decay_rate`, `lr_schedule`, `batch_size`).
Their saved config is read in today's layout (`upgrade_layout`: the settings that Trainer hard-coded, Adam with
eps 1e-8 and no weight decay, become `optimizer=adam` and `schedule=constant|cosine`), then compared as above: such
a run resumes under the same settings spelled the new way, and a real change is refused under the new key names.

A refused resume is one line per command naming every changed key (`optimizer.lr: 0.001 -> 0.002`) and writes nothing
into the run directory. An allowed change is used from the resume on and recorded: in `launches.jsonl` (old -> new)
and in `results.json["config"]`.
"""

from __future__ import annotations

from seqrec.errors import CheckpointError

RESUME_MAY_CHANGE = (
    "trainer.num_epochs",
    "trainer.patience",
    "trainer.plateau_decays",
    "trainer.time_limit_min",
    "trainer.checkpoint_every_min",
    "trainer.eval_every",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.log_every_steps",
    "trainer.resume",
    "trainer.output_dir",
    "logger.",
    "sweep_name",
    "kernels",
    "residual.kernel",
    "residual.compile",
    "loss.chunk_tokens",
    "eval.batch_size",
    "eval.item_chunk",
    "dataset.cache",
    "trainer.compile",
    "sampler.length_buckets",
    "distributed.",
    "slurm.",
)  # an entry ending in "." covers every key under it
NOT_RECORDED = ("sweep_name",)  # `${now:}` of each command: it differs at every launch and means nothing to the run


# trainer.<old key> -> (node, new key) in runs recorded before optimizer=/schedule= existed
RENAMED = {
    "lr": ("optimizer", "lr"),
    "betas": ("optimizer", "betas"),
    "warmup_steps": ("schedule", "warmup_steps"),
    "lr_decay_step": ("schedule", "decay_step"),
    "lr_decay_rate": ("schedule", "decay_rate"),
}
# what the Trainer of those runs used without a key: torch.optim.Adam(lr=, betas=) and its own schedule
IMPLIED = {
    "optimizer": {
        "_target_": "torch.optim.Adam",
        "_partial_": True,
        "_convert_": "all",
        "eps": 1e-08,
        "weight_decay": 0.0,
    },
    "schedule": {"_partial_": True},
}


def upgrade_layout(config: dict) -> dict:
    """A saved config in today's layout: one recorded with `trainer.lr` & co. is translated, others are returned as
    they are."""
    trainer = config.get("trainer") or {}
    if "optimizer" in config or "lr" not in trainer:
        return config
    upgraded = {**config, "trainer": dict(trainer)}
    for node, implied in IMPLIED.items():
        upgraded[node] = dict(implied)
    for old, (node, new) in RENAMED.items():
        if old in trainer:
            upgraded[node][new] = upgraded["trainer"].pop(old)
    kind = upgraded["trainer"].pop("lr_schedule", "constant")
    upgraded["schedule"]["_target_"] = f"seqrec.train.schedules.{kind}"
    upgraded["trainer"].pop("batch_size", None)  # sampler.batch_size held it too (an interpolation of it)
    return upgraded


def schedule_moved(saved: dict, current: dict) -> str:
    """ "schedule X over N epochs, now Y over M" when a cosine schedule is involved and its end moves, else "".
    A cosine ends at `num_epochs`: resuming under another budget (or schedule) bends the lr curve mid-run. Allowed,
    as more epochs are a common wish, but said out loud."""

    def shape(config: dict) -> tuple:
        target = (config.get("schedule") or {}).get("_target_", "constant")
        return target.rsplit(".", 1)[-1], (config.get("trainer") or {}).get("num_epochs")

    old, new = shape(upgrade_layout(saved)), shape(current)
    if "cosine" not in (old[0], new[0]) or old == new:
        return ""
    return (
        f"schedule={old[0]} over {old[1]} epochs, now schedule={new[0]} over {new[1]} "
        "(the cosine ends at trainer.num_epochs)"
    )


def flatten(node, prefix: str = "") -> dict:
    """{'optimizer.lr': 0.001, ...}: nested dicts as dotted keys; lists stay values (compared whole)."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def may_change(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in RESUME_MAY_CHANGE)


# Keys added after runs were recorded without them -> the value that does what the code did before the key existed.
# A run recorded without the key resumes when the key holds that value, and is refused (one line) otherwise.
ADDED_SINCE = {
    "dataset.duplicates": "keep",  # exact duplicate rows were kept
    "dataset.split": "leave-one-out",
    "dataset.ids": "integer",
    "loss.negatives": "uniform",
    "loss.logq": True,  # with uniform negatives the correction is one constant: no change
    "eval.valid_users": 0,  # every user validated
    "model.sparse_embedding": False,  # the item table's gradient was dense
    "trainer.compile": False,  # eager steps
    "sampler.length_buckets": 0,  # trimmed batches as wide as their longest window
    "trainer.checkpoint_every_min": 0,  # last.pt at epoch ends only
    "model.ffn": "relu",  # SASRec's FFN
    "model.ffn_multiplier": 1,  # D -> D -> D
    "loss.label_smoothing": 0.0,  # one-hot targets
}


def _changed(saved: dict, current: dict) -> dict:
    """{key: (old, new)} for every leaf that differs; a key missing on one side counts as None there (or as its
    former behaviour, for a key added since the run was recorded)."""
    old, new = flatten(upgrade_layout(saved)), flatten(current)
    for key, former in ADDED_SINCE.items():
        if key in new and key not in old and key.split(".")[0] in saved:
            old[key] = former
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def allowed_changes(saved: dict, current: dict) -> dict:
    """{key: [old, new]} for the changed settings a resume may change (recorded in launches.jsonl)."""
    if not saved or not current:
        return {}
    changed = _changed(saved, current)
    return {k: [old, new] for k, (old, new) in changed.items() if may_change(k) and k not in NOT_RECORDED}


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every changed setting a resume may not change (empty when either config is unknown)."""
    if not saved or not current:
        return []
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in _changed(saved, current).items() if not may_change(k)]


def check_resume(saved: dict, current: dict, source) -> None:
    """Raise CheckpointError (one line listing every refused change) unless `current` may continue `saved`."""
    refused = config_differences(saved, current)
    if refused:
        raise CheckpointError(
            f"{source} was trained with other settings ({'; '.join(refused)}); a resume may not change them: "
            "resume it with its own settings or start a new run directory"
        )


def check_world_size(saved_ranks: int, world_size: int, source) -> None:
    """The checkpoint holds one RNG state per rank: another number of processes changes the batches and dropout."""
    if saved_ranks != world_size:
        raise CheckpointError(
            f"{source} was trained on {saved_ranks} process(es), this launch has {world_size}; a resume may not "
            "change the number of processes: resume it with its own trainer.devices or start a new run directory"
        )
