"""bench/fit_gap.py: its unseen row is exactly what the evaluator reports for validation without seen-item
filtering, and its seen row scores each user's last training item from the window that precedes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrec.data.windows import eval_windows
from seqrec.eval.evaluator import Evaluator
from seqrec.predict import load_run
from tests.test_predict import titled_run  # noqa: F401 - the module's fixture: a tiny finished run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from fit_gap import fit_gap, seen_and_unseen_inputs  # noqa: E402


def test_unseen_row_equals_the_evaluators_unfiltered_validation(titled_run):  # noqa: F811
    data, model, cfg = load_run(titled_run)
    row = fit_gap(str(titled_run), users=10_000, seed=0)  # more than the data has: every user
    evaluator = Evaluator(data, ks=[10], filter_seen=False, maxlen=cfg["model"]["maxlen"])
    expected = evaluator.evaluate(model, "valid")
    assert row["users"] == len(evaluator.users("valid"))
    assert row["unseen"]["hr@10"] == pytest.approx(expected["val/hr@10"], abs=1e-12)
    assert row["unseen"]["ndcg@10"] == pytest.approx(expected["val/ndcg@10"], abs=1e-12)


def test_the_seen_input_is_validations_input_one_item_earlier(titled_run):  # noqa: F811
    data, _, _ = load_run(titled_run)
    users = np.arange(data.num_users)
    inputs = seen_and_unseen_inputs(data, users, 12)
    seq0, times0 = torch.from_numpy(inputs["unseen"].seq), torch.from_numpy(inputs["unseen"].times)
    seq1, times1 = torch.from_numpy(inputs["seen"].seq), torch.from_numpy(inputs["seen"].times)
    reference = eval_windows(data, users, "valid", maxlen=12, trim=False)
    assert np.array_equal(seq0.numpy(), reference.seq) and np.array_equal(times0.numpy(), reference.times)
    assert torch.equal(seq1[:, 1:], seq0[:, :-1]) and torch.equal(times1[:, 1:], times0[:, :-1])
    last = data.train_items[data.train_ptr[1:] - 1]
    assert np.array_equal(seq0[:, -1].numpy(), last)  # validation's input ends with the seen row's target
    assert (seq1[:, -1] > 0).all()


def test_the_script_prints_a_table_and_writes_json(titled_run, tmp_path):  # noqa: F811
    out = tmp_path / "gap.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fit_gap.py"), str(titled_run), "--users", "20", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "CE seen" in done.stdout and str(out) in done.stdout
    (row,) = json.loads(out.read_text())
    assert row["users"] == 20 and set(row["seen"]) == {"ce", "ndcg@10", "hr@10"}
