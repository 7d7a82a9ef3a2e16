"""Top-k next-item recommendations from a finished run, as CSV.

    python -m seqrec.predict outputs/runs/2025-01-01/10-00-00 [--users 1 2 3 | --all] [--k 10] [--out recs.csv]

The weights come from `checkpoints/best.pt`, the validation-selected checkpoint (or `--checkpoint last|PATH`),
verified against its recorded SHA-256 and unpickled weights-only. The data and model are rebuilt from the first
config found in this order:

1. the checkpoint's own `config`: the config its weights were trained under (a resumed run may have changed how
   the same maths is computed, e.g. residual.kernel), and it travels with the weights when a checkpoint is copied
   or given with `--checkpoint`;
2. `run.json["config"]`: the run's record, written once at its first launch;
3. `results.json["config"]`: the config the final results were computed under;
4. `.hydra/config.yaml`, for checkpoints and run directories made before seqrec recorded its config.

Each `_target_` in the `dataset` and `model` nodes (and nodes inside them, e.g. `model.residual`) must name one of
this package's own dataset builders, models or residual classes, or predict refuses in one line naming the key:
a run directory is a file someone can hand you, and nothing it names is imported or called otherwise. Run it from
the directory training ran in, so relative dataset paths resolve. Each user's whole known sequence (training items,
then the validation and test items) is the input; items the user has already interacted with are never
recommended. Columns: user, rank, item, score (the model's logit) and, where the dataset has titles, title. User
and item ids are the dataset's original ids. The CSV is written atomically; bad arguments are one line, exit 1.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch

from seqrec.errors import SeqrecError

log = logging.getLogger(__name__)

DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class PredictError(SeqrecError):
    """A user error: reported as one line, exit status 1."""


# --------------------------------------------------------------------------------------------- what may be built
def _is_dataset_builder(obj) -> bool:
    return callable(obj) and obj.__module__ == "seqrec.data.dataset" and not obj.__name__.startswith("_")


def _is_model(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__.startswith("seqrec.models.")


def _is_residual(obj) -> bool:
    return isinstance(obj, type) and obj.__module__ == "seqrec.nn.residual" and not obj.__name__.startswith("_")


# {config path of a node: (what it must be, test)}; a `_target_` anywhere else must pass one of these tests
BUILDABLE = {
    "dataset": ("a dataset builder from seqrec.data.dataset", _is_dataset_builder),
    "model": ("a model class from seqrec.models", _is_model),
    "model.residual": ("a residual class from seqrec.nn.residual", _is_residual),
}


def _resolve_own(name: str):
    """The object `name` (module.attribute) names, importing only modules of this package; None if it names none.

    The object must be defined where the name says (`obj.__module__`, `obj.__qualname__`), so a re-export such
    as `seqrec.data.dataset.np` cannot lead out of the package."""
    if not isinstance(name, str) or not DOTTED_NAME.fullmatch(name) or not name.startswith("seqrec."):
        return None
    module_name, _, attribute = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    obj = getattr(module, attribute, None)
    defined_here = getattr(obj, "__module__", None) == module_name and getattr(obj, "__qualname__", None) == attribute
    return obj if defined_here else None


def walk(node, path: str):
    """(config path, value) for `node` and everything nested in it, parents first."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from walk(value, f"{path}.{key}")


def check_targets(node, source: str, path: str) -> None:
    """PredictError naming the first `_target_` under `node` (at config path `path`) that is not on BUILDABLE."""
    for where, value in walk(node, path):
        if not isinstance(value, dict) or "_target_" not in value:
            continue
        target = value["_target_"]
        kinds = [BUILDABLE[where]] if where in BUILDABLE else list(BUILDABLE.values())
        obj = _resolve_own(target)
        if obj is None or not any(test(obj) for _, test in kinds):
            raise PredictError(
                f"{source}: {where}._target_={target!r} is not {' or '.join(kind for kind, _ in kinds)}; "
                "predict rebuilds only seqrec's own classes and refuses to import or call anything else"
            )


def check_no_interpolation(node, source: str, path: str) -> None:
    """A recorded config was resolved when it was written; a `${...}` in it (which instantiate would resolve, e.g.
    from environment variables) means the file was edited afterwards."""
    for where, value in walk(node, path):
        if isinstance(value, str) and "${" in value:
            raise PredictError(
                f"{source}: {where}={value!r} is an interpolation, but a recorded config is stored resolved"
            )


# --------------------------------------------------------------------------------------------- rebuilding a run
def find_checkpoint(run: Path, checkpoint: str) -> Path:
    if checkpoint not in ("best", "last"):
        return Path(checkpoint)
    path = run / "checkpoints" / f"{checkpoint}.pt"
    if path.is_file():
        return path
    if not (run / "checkpoints").is_dir():
        raise PredictError(f"{run}: no checkpoints/ folder (did the run finish its first epoch?)")
    hint = " (has the run finished an evaluation? try --checkpoint last)" if checkpoint == "best" else ""
    raise PredictError(f"{path}: checkpoint not found{hint}")


def looks_like_a_run(run: Path) -> bool:
    markers = ("run.json", "results.json", "checkpoints", ".hydra/config.yaml")
    return any((run / m).exists() for m in markers)


def rebuild_config(run: Path, ckpt: Path, state: dict) -> tuple[dict, str]:
    """({"dataset": ..., "model": ...} resolved to plain data, the file it came from), in the module docstring's
    order."""
    from omegaconf import OmegaConf

    from seqrec.run_dirs import read_config

    if isinstance(state.get("config"), dict) and state["config"].get("model"):
        config, source = state["config"], f"{ckpt} (its stored config)"
    else:
        config, source_path = read_config(run)
        if config is None:
            raise PredictError(f"{ckpt}: holds no config and {run} has no run.json, results.json config or .hydra")
        source = str(source_path)
    if isinstance(config, dict):  # recorded, resolved at launch: plain data, read as it is
        nodes = {key: copy.deepcopy(config.get(key)) for key in ("dataset", "model")}
        for key, node in nodes.items():
            check_no_interpolation(node, source, key)
    else:  # a legacy .hydra/config.yaml: Hydra's unresolved composition
        try:
            nodes = {key: OmegaConf.to_container(config[key], resolve=True) for key in ("dataset", "model")}
        except Exception as e:  # noqa: BLE001 - a missing node or an interpolation that only resolves inside Hydra
            reason = str(e).splitlines()[0][:160]
            raise PredictError(f"{source}: cannot read the dataset/model config ({reason})") from None
    for key, node in nodes.items():
        if not isinstance(node, dict):
            raise PredictError(f"{source}: {key} is not a config node with a _target_")
        check_targets(node, source, key)
    return nodes, source


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """(data, model in eval mode, {"dataset": ..., "model": ...} config) rebuilt from a run directory."""
    from seqrec.compose import build_data_and_model
    from seqrec.train.checkpoint import load_checkpoint

    run = Path(run_dir)
    if not run.is_dir():
        raise PredictError(f"{run_dir}: no such directory")
    if checkpoint in ("best", "last") and not looks_like_a_run(run):
        raise PredictError(f"{run_dir}: not a run directory (no run.json, checkpoints/ or results.json)")
    ckpt = find_checkpoint(run, checkpoint)
    state = load_checkpoint(ckpt)
    cfg, source = rebuild_config(run, ckpt, state)
    try:
        data, model = build_data_and_model({"dataset": cfg["dataset"], "model": cfg["model"]})
    except SeqrecError:
        raise
    except Exception as e:  # noqa: BLE001 - instantiate wraps the real cause
        if isinstance(e.__cause__, SeqrecError):  # e.g. a DataError naming a missing dataset file
            raise e.__cause__ from None
        raise PredictError(f"{source}: cannot rebuild the data/model ({str(e).splitlines()[0][:200]})") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise PredictError(
            f"{ckpt}: does not fit the model/data of {source} ({str(e).splitlines()[0][:160]})"
        ) from None
    model.eval()
    return data, model, cfg


def full_windows(data, users: np.ndarray, maxlen: int) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """Right-aligned windows over each user's whole known sequence (train + valid + test items).

    Returns:
        (seq (B, W), times (B, W) or None, per-user arrays of every item the user has interacted with).
    """
    histories, time_rows = [], []
    for u in users:
        items = [data.user_history(u)]
        times = [data.train_times[data.train_ptr[u] : data.train_ptr[u + 1]]] if data.has_time else []
        for item, t in ((data.valid_item, data.valid_time), (data.test_item, data.test_time)):
            if item[u] > 0:
                items.append(item[u : u + 1])
                if data.has_time:
                    times.append(t[u : u + 1])
        histories.append(np.concatenate(items))
        if data.has_time:
            time_rows.append(np.concatenate(times))
    width = max(1, min(maxlen, max(len(h) for h in histories)))
    seq = np.zeros((len(users), width), dtype=np.int64)
    tim = np.zeros((len(users), width), dtype=np.int64) if data.has_time else None
    for row, h in enumerate(histories):
        tail = h[-width:]
        seq[row, width - len(tail) :] = tail
        if tim is not None:
            t = time_rows[row][-width:]
            tim[row, width - len(t) :] = t
    return seq, tim, histories


@torch.no_grad()
def recommend(
    data, model, users: np.ndarray, k: int = 10, maxlen: int = 200, batch_size: int = 256, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k unseen items per user.

    Args:
        users: (B,) internal user indices 0..U-1.

    Returns:
        (items (B, k) internal item ids 1..I, scores (B, k)), best first.
    """
    from seqrec.data.windows import user_time_scale

    model = model.to(device)
    scale_all = user_time_scale(data)
    k = min(k, data.num_items)
    out_items = np.zeros((len(users), k), dtype=np.int64)
    out_scores = np.zeros((len(users), k), dtype=np.float32)
    for start in range(0, len(users), batch_size):
        u = users[start : start + batch_size]
        seq, times, histories = full_windows(data, u, maxlen)
        t_seq = torch.from_numpy(seq).to(device)
        t_times = torch.from_numpy(times).to(device) if times is not None else None
        scale = torch.from_numpy(scale_all[u]).to(device) if scale_all is not None else None
        h = model(t_seq, t_times, scale)[:, -1].float()  # (b, D): the prediction after the last known item
        scores = model.head.score_all(h)  # (b, I): items 1..I
        rows = np.repeat(np.arange(len(u)), [len(x) for x in histories])
        seen = np.concatenate(histories) - 1
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(seen).to(device)] = -torch.inf
        top = torch.topk(scores, k, dim=1)
        out_items[start : start + len(u)] = top.indices.cpu().numpy() + 1
        out_scores[start : start + len(u)] = top.values.cpu().numpy()
    return out_items, out_scores


def resolve_users(data, requested: list[str] | None) -> np.ndarray:
    """Internal indices of the requested original user ids (all users if None)."""
    if requested is None:
        return np.arange(data.num_users, dtype=np.int64)
    index = {str(uid): i for i, uid in enumerate(data.user_ids.tolist())}
    unknown = [u for u in requested if str(u) not in index]
    if unknown:
        raise PredictError(
            f"unknown user id{'s' * (len(unknown) > 1)}: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (dataset '{data.name}' has {data.num_users} users, "
            f"e.g. {', '.join(str(x) for x in data.user_ids[:3].tolist())})"
        )
    return np.array([index[str(u)] for u in requested], dtype=np.int64)


def write_csv(data, users: np.ndarray, items: np.ndarray, scores: np.ndarray, out) -> int:
    titles = data.item_titles
    header = ["user", "rank", "item", "score"] + (["title"] if titles is not None else [])
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    n = 0
    for row, u in enumerate(users):
        for rank, (item, score) in enumerate(zip(items[row], scores[row], strict=False), 1):
            if not np.isfinite(score):  # fewer unseen items than k
                continue
            line = [_plain(data.user_ids[u]), rank, _plain(data.item_ids[item]), f"{score:.4f}"]
            if titles is not None:
                line.append(str(titles[item]))
            writer.writerow(line)
            n += 1
    return n


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors become a PredictError: one `error: ...` line and exit status 1, like every user error here
    (argparse would print the usage too and exit with 2)."""

    def error(self, message: str):
        raise PredictError(f"{message} (see {self.prog} --help)")


def positive_int(flag: str, value: int) -> int:
    if value < 1:
        raise PredictError(f"{flag} must be >= 1, got {value}")
    return value


def pick_device(name: str) -> torch.device:
    """The torch device for `--device`, or PredictError if it is no device name or this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PredictError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PredictError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictError(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_writable(out: Path) -> None:
    """PredictError now, before the model runs, if the CSV cannot be written to `out`."""
    if out.is_dir():
        raise PredictError(f"--out {out}: is a directory; give a file name, e.g. {out / 'predictions.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(out.name + ".tmp")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PredictError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def write_csv_file(data, users: np.ndarray, items: np.ndarray, scores: np.ndarray, out: Path) -> int:
    """write_csv into `out` atomically (a reader never sees half a file); the number of rows written."""
    from seqrec.train.checkpoint import atomic_write_bytes

    rows = []

    def write(f):
        text = io.TextIOWrapper(f, newline="", encoding="utf-8")
        rows.append(write_csv(data, users, items, scores, text))
        text.flush()
        text.detach()  # leave the binary file open for atomic_write_bytes to sync and close

    try:
        atomic_write_bytes(out, write)
    except OSError as e:
        raise PredictError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m seqrec.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (outputs/runs/... or one job of a sweep)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--users", nargs="+", metavar="ID", help="original user ids (default: all users)")
    who.add_argument("--all", action="store_true", help="every user (the default)")
    parser.add_argument("--k", type=int, default=10, help="recommendations per user (default 10)")
    parser.add_argument("--out", default=None, help="CSV file (default <run_dir>/predictions.csv; - for stdout)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a path to a .pt file")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=256, help="users per forward pass (default 256)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parser.parse_args(argv)
        k, batch_size = positive_int("--k", args.k), positive_int("--batch-size", args.batch_size)
        device = pick_device(args.device)
        out = None if args.out == "-" else Path(args.out) if args.out else Path(args.run_dir) / "predictions.csv"
        if out is not None and Path(args.run_dir).is_dir():
            check_writable(out)
        data, model, cfg = load_run(args.run_dir, args.checkpoint)
        users = resolve_users(data, args.users)
        maxlen = int(cfg["model"]["maxlen"])
        items, scores = recommend(data, model, users, k, maxlen=maxlen, batch_size=batch_size, device=device)
        if out is None:
            write_csv(data, users, items, scores, sys.stdout)
            return 0
        n = write_csv_file(data, users, items, scores, out)
        print(f"wrote {n} recommendations for {len(users)} users to {out}", file=sys.stderr)
    except SeqrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
