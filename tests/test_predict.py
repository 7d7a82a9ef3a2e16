"""`python -m seqrec.predict`: top-k from the best checkpoint of a real (tiny) run, rebuilt from its
.hydra/config.yaml; k rows per user, never an item the user has seen, titles where the dataset has them."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seqrec.predict import main
from seqrec.run import run

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "hardware=cpu",
    "model.maxlen=12",
    "model.hidden_units=16",
    "trainer.num_epochs=2",
    "trainer.eval_every=1",
    "trainer.progress=false",
    "trainer.warmup_steps=0",
    "trainer.batch_size=32",
]


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    """Train in-process and write .hydra/config.yaml as Hydra would (unresolved composition)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY, *overrides, f"trainer.output_dir={run_dir}", f"logger.output_dir={run_dir}"],
        )
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run(cfg)
    return run_dir


@pytest.fixture(scope="module")
def titled_run(tmp_path_factory) -> Path:
    """A run on a small `user item timestamp` file with a titles file (raw ids offset, to test the id mapping)."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(40):
        items = rng.choice(np.arange(1, 31), size=rng.integers(5, 12), replace=False)
        lines += [f"{1000 + u} {100 + i} {1_000_000 + 3600 * t}" for t, i in enumerate(items)]
    (root / "interactions.txt").write_text("\n".join(lines) + "\n")
    (root / "titles.tsv").write_text("".join(f"{100 + i}\tMovie {i} (19{60 + i})\n" for i in range(1, 31)))
    return train_run(
        root / "run",
        ["dataset=file", f"dataset.path={root / 'interactions.txt'}", f"dataset.titles_path={root / 'titles.tsv'}"],
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def known_items(run_dir: Path) -> dict[str, set[str]]:
    """Every (original) item each user has interacted with, from the raw interaction file."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    seen: dict[str, set[str]] = {}
    for line in Path(cfg.dataset.path).read_text().splitlines():
        user, item, _ = line.split()
        seen.setdefault(user, set()).add(item)
    return seen


def test_all_users_k_rows_no_history_with_titles(titled_run, tmp_path):
    out = tmp_path / "recs.csv"
    assert main([str(titled_run), "--all", "--k", "5", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["user", "rank", "item", "score", "title"]
    seen = known_items(titled_run)
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user"], []).append(r)
    assert set(by_user) == set(seen)
    for user, recs in by_user.items():
        assert [r["rank"] for r in recs] == ["1", "2", "3", "4", "5"]
        assert not {r["item"] for r in recs} & seen[user], f"{user} was recommended an item from their history"
        assert len({r["item"] for r in recs}) == 5
        scores = [float(r["score"]) for r in recs]
        assert scores == sorted(scores, reverse=True)
        for r in recs:
            n = int(r["item"]) - 100
            assert r["title"] == f"Movie {n} (19{60 + n})"


def test_selected_users_match_the_models_own_ranking(titled_run, tmp_path):
    out = tmp_path / "two.csv"
    assert main([str(titled_run), "--users", "1003", "1007", "--k", "3", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [r["user"] for r in rows] == ["1003"] * 3 + ["1007"] * 3
    # independent check: score every item with the best checkpoint through the model's own API
    import torch

    cfg = OmegaConf.load(titled_run / ".hydra" / "config.yaml")
    data = instantiate(cfg.dataset)
    model = instantiate(cfg.model, num_items=data.num_items)
    model.load_state_dict(torch.load(titled_run / "checkpoints" / "best.pt", weights_only=False)["model"])
    model.eval()
    u = int(np.flatnonzero(data.user_ids == 1003)[0])
    full = np.concatenate([data.user_history(u), [data.valid_item[u], data.test_item[u]]])
    times = np.concatenate(
        [data.train_times[data.train_ptr[u] : data.train_ptr[u + 1]], [data.valid_time[u], data.test_time[u]]]
    )
    with torch.no_grad():
        from seqrec.data.windows import user_time_scale

        scale = torch.from_numpy(user_time_scale(data)[[u]])
        h = model(torch.from_numpy(full[-12:][None]), torch.from_numpy(times[-12:][None]), scale)[:, -1]
        scores = model.head.score_all(h)[0]
    scores[torch.from_numpy(full - 1)] = -torch.inf
    expected = [str(data.item_ids[i + 1]) for i in torch.topk(scores, 3).indices.tolist()]
    assert [r["item"] for r in rows[:3]] == expected


def test_dataset_without_titles_has_no_title_column(tmp_path, capsys):
    run_dir = train_run(tmp_path / "run", ["dataset.num_users=60", "dataset.num_items=50"])
    assert main([str(run_dir), "--users", "0", "1", "--k", "4", "--out", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "user,rank,item,score" and len(lines) == 1 + 2 * 4
    assert main([str(run_dir), "--k", "2"]) == 0  # default: every user, into the run directory
    assert len(read_csv(run_dir / "predictions.csv")) == 2 * 60


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("empty", "not a run directory"),
        ("no_checkpoint", "checkpoint not found"),
    ],
)
def test_clear_one_line_errors(tmp_path, capsys, case, message):
    target = tmp_path / case
    if case != "missing":
        target.mkdir()
    if case == "no_checkpoint":
        (target / ".hydra").mkdir()
        (target / ".hydra" / "config.yaml").write_text("seed: 1\n")
    assert main([str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_unknown_user_is_a_clear_error(titled_run, capsys):
    assert main([str(titled_run), "--users", "1003", "nobody", "--out", "-"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown user id: nobody") and "\n" not in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
