"""Every bad input gets one clear line: exit status 1 and exactly one `error: ...` line on stderr naming the file:line
or the config key and what was expected, never a traceback; legal but suspicious input gets a warning and a
documented behaviour instead.

The cases run through the real entry point: `seqrec.run.main` in-process (what `python train.py` calls after Hydra
has composed the config), `composition_problem` for what Hydra itself cannot compose, and `python train.py` in a
subprocess for a representative few (which also shows that a refused run leaves an existing run directory alone).
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from seqrec.data.dataset import from_file, synthetic
from seqrec.errors import ConfigError
from seqrec.eval.evaluator import Evaluator
from seqrec.run import main
from seqrec.train.sampler import TrainSampler
from seqrec.utils.config import check_config, composition_problem
from tests.conftest import CONF, TINY, compose_config, train_cli

# 5 users x 7 items with timestamps: legal, every user evaluated (line k + 1 holds user k // 7 + 1)
GOOD = "".join(f"{u} {i} {1000 + 10 * k}\n" for u in range(1, 6) for k, i in enumerate(range(1, 8)))
# the tiny run without the synthetic dataset's keys
FILE_RUN = [o for o in TINY if not o.startswith("dataset.")] + ["dataset=file", "model=sasrec"]


def _replace_line(text: str, lineno: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[lineno - 1] = new + "\n"
    return "".join(lines)


# name -> (file content, extra overrides, expected error after "error: <path>")
FILE_CASES = {
    "one_line": ("1 2\n", [], r": no user has a validation target: .* needs users with >= 3 interactions"),
    "every_user_one_interaction": ("1 1\n2 2\n3 3\n", [], r": no user has a validation target"),
    "no_user_with_targets": ("1 1\n1 2\n2 3\n2 1\n", [], r": no user has a validation target: .*has here: 2\)"),
    "nothing_left_to_train": (
        "".join(f"{u} {i}\n" for u in (1, 2) for i in (1, 2, 3)),
        [],
        r": no user has 2 training interactions left .* nothing to train on",
    ),
    "empty_file": ("", [], r": empty file, expected at least one 'user item \[timestamp\]' line"),
    "blank_lines_only": ("\n  \n\t\n", [], r": empty file"),
    "header_only": ("user,item,timestamp\n", [], r": no interactions \(only a header line\)"),
    "single_column": ("1\n2\n", [], r":1: expected 'user item \[timestamp\]'"),
    "wrong_column_count_on_line_36": (
        GOOD + "7 8 9 10 11\n",
        [],
        r":36: expected 3 fields 'user item timestamp', got 5",
    ),
    "non_numeric_item_on_line_18": (
        _replace_line(GOOD, 18, "3 x 1030"),
        [],
        r":18: expected 'user item timestamp' with integer ids, got '3 x 1030'",
    ),
    "fractional_user_id": (_replace_line(GOOD, 10, "2.5 3 1020"), [], r":10: expected .* with integer ids"),
    "id_beyond_int64": (_replace_line(GOOD, 10, "99999999999999999999999 3 1020"), [], r":10: .*integer ids"),
    "non_numeric_timestamp": (_replace_line(GOOD, 4, "1 4 yesterday"), [], r":4: .*with a numeric timestamp"),
    "nan_timestamp": (_replace_line(GOOD, 1, "1 1 nan"), [], r":1: .*with a numeric timestamp, got '1 1 nan'"),
    "infinite_timestamp": (_replace_line(GOOD, 2, "1 2 inf"), [], r":2: .*with a numeric timestamp"),
    "huge_timestamp": (_replace_line(GOOD, 3, "1 3 1e30"), [], r":3: timestamp out of range, expected unix seconds"),
    "binary_file": (bytes(range(256)) * 4, [], r":1: binary content \(a NUL byte\), expected a plain-text"),
    "utf16_file": (GOOD.encode("utf-16"), [], r": is UTF-16 text, expected ASCII or UTF-8"),
    "gzip_file": (gzip.compress(GOOD.encode()), [], r": is a gzip-compressed file, expected plain text"),
    "latin1_bytes_in_an_id": (_replace_line(GOOD, 1, "1 \xe9 1000").encode("latin-1"), [], r":1: .*integer ids"),
    "mixed_separators": (
        _replace_line(GOOD, 10, "2,3,1020"),
        [],
        r":10: expected 3 fields .* \(this line uses commas; the file's first line uses whitespace",
    ),
    "filter_removes_everything": (
        GOOD,
        ["dataset.min_item_interactions=100"],
        r": no interactions left after filtering \(dataset.min_item_interactions=100",
    ),
    "duplicates_refused_on_request": (
        GOOD + GOOD.splitlines(keepends=True)[3],
        ["dataset.duplicates=error"],
        r":36: duplicate of line 4 \(same user, item and timestamp\); 1 duplicate row in all",
    ),
    "tisasrec_without_timestamps": (
        "".join(f"{u} {i}\n" for u in (1, 2) for i in range(1, 6)),
        ["model=tisasrec"],
        r"^error: model=tisasrec needs timestamps",
    ),
    "missing_titles_file": (
        GOOD,
        ["dataset.titles_path=/nonexistent/movies.dat"],
        r"movies.dat: titles file not found",
    ),
}

# overrides on the tiny synthetic run -> expected error
CONFIG_CASES = {
    "dataset.num_users=0": r"invalid config: dataset.num_users=0: must be >= 1$",
    "dataset.num_users=-3": r"dataset.num_users=-3: must be >= 1",
    "dataset.num_items=2": r"dataset.num_items=2: must be >= 3",
    "seed=-1": r"invalid config: seed=-1: must be in \[0, 2\*\*63\)$",
    "seed=abc": r"seed='abc': expected int",
    "dataset.seed=-1": r"dataset.seed=-1: must be in \[0, 2\*\*63\)",
    "+dataset.p_habit=2": r"dataset.p_habit=2: must be in \[0, 1\]",
    "+dataset.mean_length=-1": r"dataset.mean_length=-1: must be > 0",
    "model.maxlen=0": r"model.maxlen=0: must be > 0",
    "model.maxlen=-5": r"model.maxlen=-5: must be > 0",
    "model.num_heads=3": r"model.hidden_units=32: must be divisible by model.num_heads=3",
    "model.dropout_rate=1": r"model.dropout_rate=1: must be in \[0, 1\)",
    "optimizer.lr=abc": r"optimizer.lr='abc': expected float",
    "optimizer.lr=inf": r"optimizer.lr=inf: must be a finite number",
    "optimizer.lr=nan": r"optimizer.lr=nan: must be a finite number",
    "sampler.batch_size=1.5": r"invalid config: sampler.batch_size=1.5: expected int$",  # reported once
    "trainer.num_epochs=0": r"trainer.num_epochs=0: must be > 0",
    "trainer.devices=0": r"trainer.devices=0: must be > 0",
    "optimizer.betas=[0.9,1.5]": r"optimizer.betas=\[0.9, 1.5\]: must be \[b1, b2\] in \[0, 1\)",
    "+trainer.lrr=0.1": r"trainer.lrr: unknown key for seqrec.train.trainer.Trainer \(accepted: ",
    "eval.ks=5": r"eval.ks=5: expected list",
    "eval.ks=[]": r"eval.ks=\[\]: must be a non-empty list of positive ints",
    "eval.ks=[0,10]": r"eval.ks=\[0, 10\]: must be a non-empty list of positive ints",
    "eval.num_negatives=0": r"eval.num_negatives=0: must be > 0",
    "distributed.master_port=70000": r"distributed.master_port=70000: must be a port in \[0, 65535\]",
}

# config problems that need two overrides
PAIRED_CONFIG_CASES = {
    "sampled_k_above_candidates": (["eval.protocol=sampled", "eval.ks=[10,200]"], r"eval.ks=\[10, 200\]: k=200"),
    "gbce_calibration_out_of_range": (["loss=gbce", "loss.t=2"], r"loss.t=2: must be in \[0, 1\]"),
    "label_smoothing_of_one": (["loss=ce", "loss.label_smoothing=1.0"], r"loss.label_smoothing=1.0: must be in \[0, 1"),
    "synthetic_min_above_max_length": (
        ["+dataset.min_length=10", "+dataset.max_length=5"],
        r"dataset.min_length=10: must be <= dataset.max_length=5",
    ),
    "unknown_file_format": (["dataset=file", "dataset.path=x.txt", "dataset.format=parquet"], r"dataset.format="),
    "unknown_duplicates_rule": (["dataset=file", "dataset.path=x.txt", "dataset.duplicates=maybe"], r"duplicates="),
    "negative_filter": (["dataset=file", "dataset.path=x.txt", "dataset.min_user_interactions=-1"], r"must be >= 0"),
    "sparse_table_with_a_dense_optimizer": (
        ["model.sparse_embedding=true"],
        r"optimizer._target_=torch.optim.Adam with model.sparse_embedding=true: .*use optimizer=lazy_adam",
    ),
    "lazy_adam_with_the_full_softmax": (
        ["optimizer=lazy_adam", "loss=ce"],
        r"loss._target_=seqrec.train.losses.CrossEntropy with model.sparse_embedding=true: the full softmax",
    ),
    "lazy_adam_with_l2_emb": (
        ["optimizer=lazy_adam", "trainer.l2_emb=0.001"],
        r"trainer.l2_emb=0.001 with model.sparse_embedding=true: .*set trainer.l2_emb=0",
    ),
    "lazy_adam_with_grad_clip": (
        ["optimizer=lazy_adam", "trainer.grad_clip=1.0"],
        r"trainer.grad_clip=1.0 with model.sparse_embedding=true: .*clip_grad_norm_",
    ),
}

# command lines Hydra cannot compose -> expected one line (the rest of Hydra's report is dropped)
COMPOSITION_CASES = {
    "model=foo": r"^model=foo: no such option \(available: sasrec, tisasrec\)$",
    "dataset=nope": r"^dataset=nope: no such option \(available: .*synthetic\)$",
    "optimizer.lrr=0.1": r"^optimizer.lrr: no such key in the config \(did you mean optimizer.lr\?\)$",
    "model.maxln=3": r"^model.maxln: no such key in the config \(did you mean model.maxlen\?\)$",
    "dataset.min_length=3": r"^dataset.min_length: no such key .*to add a key the config does not list: "
    r"\+dataset.min_length=3\)$",
    "model.maxlen=[": r"^model.maxlen=\[: cannot parse this override",
    "model=sasrec,tisasrec": r"^Ambiguous value for argument 'model=sasrec,tisasrec'; 1\. .*--multirun",
}


def _assert_one_error_line(err: str, pattern: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len([line for line in lines if line.startswith("error:")]) == 1, err
    assert lines[0].startswith("error: "), err
    assert all(line.startswith("  ") for line in lines[1:]), err  # only the problems of one list may follow
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def _refused(cfg, capsys) -> str:
    """Run the entry point's body in-process; it must exit 1 with one error line."""
    with pytest.raises(SystemExit) as stop:
        main(cfg)
    assert stop.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_bad_data_file_gets_one_line_naming_the_file(name, tmp_path, capsys):
    content, extra, pattern = FILE_CASES[name]
    path = tmp_path / f"{name}.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = compose_config(FILE_RUN + [f"dataset.path={path}"] + extra, tmp_path / "run")
    line = _assert_one_error_line(_refused(cfg, capsys), pattern)
    if name not in ("tisasrec_without_timestamps", "missing_titles_file"):
        assert line.startswith(f"error: {path}"), line  # the file is named (and the line where there is one)
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


@pytest.mark.parametrize("where", ["directory", "missing"])
def test_path_that_is_not_a_file(where, tmp_path, capsys):
    path = tmp_path if where == "directory" else tmp_path / "nope.txt"
    cfg = compose_config(FILE_RUN + [f"dataset.path={path}"], tmp_path / "run")
    expected = "is a directory" if where == "directory" else "file not found"
    _assert_one_error_line(_refused(cfg, capsys), f"^error: {path}: {expected}")


@pytest.mark.parametrize("override", list(CONFIG_CASES))
def test_bad_config_value_gets_one_line_naming_the_key(override, tmp_path, capsys):
    cfg = compose_config(TINY + [override], tmp_path / "run")
    _assert_one_error_line(_refused(cfg, capsys), CONFIG_CASES[override])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(PAIRED_CONFIG_CASES))
def test_bad_config_combination_gets_one_line(name, tmp_path, capsys):
    overrides, pattern = PAIRED_CONFIG_CASES[name]
    base = FILE_RUN if "dataset=file" in overrides else TINY
    cfg = compose_config(base + overrides, tmp_path / "run")
    _assert_one_error_line(_refused(cfg, capsys), pattern)


@pytest.mark.parametrize("override", list(COMPOSITION_CASES))
def test_command_line_hydra_cannot_compose_gets_one_line(override):
    problem = composition_problem([override], str(CONF))
    assert problem is not None and "\n" not in problem
    assert re.search(COMPOSITION_CASES[override], problem), problem


def test_batch_smaller_than_the_ranks_is_refused(tmp_path):
    # checked directly: through `main`, trainer.devices=2 starts the DDP workers before the check (tens of seconds)
    cfg = compose_config(TINY + ["trainer.devices=2", "sampler.batch_size=1"], tmp_path)
    with pytest.raises(ConfigError, match=r"^invalid config: sampler.batch_size=1: must be >= trainer.devices=2"):
        check_config(cfg)


def test_several_config_problems_are_listed_under_one_error_line(tmp_path, capsys):
    cfg = compose_config(TINY + ["seed=-1", "model.maxlen=0", "optimizer.lr=abc"], tmp_path)
    err = _assert_one_error_line(_refused(cfg, capsys), r"^error: invalid config \(3 problems\):$")
    assert err


# ------------------------------------------------------------------------ legal but suspicious: a warning, kept


def _data(tmp_path, text: str, caplog, **kwargs):
    path = tmp_path / "x.txt"
    path.write_text(text)
    with caplog.at_level(logging.INFO, logger="seqrec"):
        return from_file(path=str(path), **kwargs), path


def test_exact_duplicate_rows_are_dropped_with_a_count(tmp_path, caplog):
    doubled = "".join(line + "\n" + line + "\n" for line in GOOD.splitlines())
    data, path = _data(tmp_path, doubled, caplog)
    clean = from_file(path=str(_write(tmp_path / "clean.txt", GOOD)))
    assert np.array_equal(data.train_items, clean.train_items) and np.array_equal(data.test_item, clean.test_item)
    assert f"{path}:2: duplicate of line 1 (same user, item and timestamp); 35 duplicate rows in all, dropped" in (
        caplog.text
    )


def test_repeat_consumption_at_another_time_is_kept(tmp_path, caplog):
    data, _ = _data(tmp_path, GOOD + "1 1 5000\n", caplog)
    assert data.test_item[0] == data.item_ids.tolist().index(1) and "duplicate" not in caplog.text


def test_duplicates_without_timestamps_only_straight_repeats(tmp_path, caplog):
    # user 1: a a b a c d -> the second a (line 2) is a duplicate; the later a (repeat after b) is kept
    text = "1 10\n1 10\n1 20\n1 10\n1 30\n1 40\n"
    data, path = _data(tmp_path, text, caplog)
    assert data.num_interactions == 5 and f"{path}:2: duplicate of line 1 (same user and item straight again" in (
        caplog.text
    )
    kept, _ = _data(tmp_path, text, caplog, duplicates="keep")
    assert kept.num_interactions == 6 and "kept (dataset.duplicates=keep)" in caplog.text


@pytest.mark.parametrize(
    "times,needle",
    [
        (-25_000, "15 negative timestamps (before 1970), kept"),
        (1_600_000_000_000, "milliseconds? seqrec reads seconds"),
    ],
)
def test_suspicious_timestamps_warn(times, needle, tmp_path, caplog):
    text = "".join(f"{u} {i} {times + 10_000 * k}\n" for u in range(1, 6) for k, i in enumerate(range(1, 8)))
    data, path = _data(tmp_path, text, caplog)
    assert f"{path}:1: " in caplog.text and needle in caplog.text and data.has_time


def test_items_only_in_validation_or_test_warn(tmp_path, caplog):
    _data(tmp_path, GOOD, caplog)  # items 6 and 7 are only ever the last two of every user
    assert "2 items appear only as validation/test targets, never in training (e.g. item 6)" in caplog.text


def test_users_with_only_training_items_are_reported(tmp_path, caplog):
    data, _ = _data(tmp_path, GOOD + "9 1 1\n9 2 2\n", caplog)
    assert data.valid_item[-1] == 0 and data.train_lengths[-1] == 2
    assert "1 users with < 3 interactions are used for training only" in caplog.text


@pytest.mark.parametrize("variant", ["crlf", "trailing_whitespace", "negative_ids"])
def test_harmless_variants_read_as_the_clean_file(variant, tmp_path, caplog):
    text = {
        "crlf": GOOD.replace("\n", "\r\n"),
        "trailing_whitespace": GOOD.replace("\n", "  \t\n"),
        "negative_ids": "".join(f"-{line}\n" for line in GOOD.splitlines()),
    }[variant]
    data, _ = _data(tmp_path, text, caplog)
    clean = from_file(path=str(_write(tmp_path / "clean.txt", GOOD)))
    assert np.array_equal(data.train_items, clean.train_items) and np.array_equal(data.train_times, clean.train_times)


def test_batch_larger_than_the_users_gives_one_batch():
    data = synthetic(num_users=20, num_items=30, seed=0)
    assert len(TrainSampler(data, batch_size=1000, maxlen=10).global_batches(0)) == 1


def test_cutoff_covering_every_item_warns(caplog):
    data = synthetic(num_users=20, num_items=10, seed=0)
    with caplog.at_level(logging.WARNING, logger="seqrec"):
        Evaluator(data, ks=[5, 10, 20])
    assert "eval.ks=[5, 10, 20]: k >= the 10 items of synthetic, so hr@k = 1 there" in caplog.text


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the real command line, a representative few

SUBPROCESS_CASES = {
    "one_line_file": (["model=sasrec", "dataset=file", "dataset.path={tmp}/one.txt"], r"one.txt: no user has a valid"),
    "negative_seed": (["seed=-1"], r"^error: invalid config: seed=-1: must be in \[0, 2\*\*63\)$"),
    "unknown_model_option": (["model=foo"], r"^error: model=foo: no such option \(available: sasrec, tisasrec\)$"),
    "misspelled_key": (["optimizer.lrr=0.1"], r"^error: optimizer.lrr: no such key in the config \(did you mean"),
}
SLOW = pytest.mark.slow  # a few seconds each (python + torch start); the first one stays in the default run


@pytest.mark.parametrize("name", [n if n == "one_line_file" else pytest.param(n, marks=SLOW) for n in SUBPROCESS_CASES])
def test_train_py_prints_one_line_and_exits_1(name, tmp_path):
    (tmp_path / "one.txt").write_text("1 2\n")
    run_dir = tmp_path / "earlier_run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"test/ndcg@10": 0.5}')
    overrides = [o.format(tmp=tmp_path) for o in SUBPROCESS_CASES[name][0]]
    proc = train_cli(*overrides, "trainer.device=cpu", run_dir=run_dir, timeout=120)
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(proc.stderr, SUBPROCESS_CASES[name][1])
    assert (run_dir / "results.json").read_text() == '{"test/ndcg@10": 0.5}'  # the earlier run is untouched
    assert not (run_dir / "checkpoints").exists()
