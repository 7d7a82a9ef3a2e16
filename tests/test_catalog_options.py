"""The large-catalogue options end to end: logQ-corrected mixed negatives and a validation user sample in a run."""

import math

import pytest

from seqrec.run import run
from tests.conftest import TINY, compose_config


@pytest.mark.parametrize("negatives", ["in_batch", "mixed"])
def test_a_run_trains_with_in_batch_negatives_and_validates_on_a_user_sample(tmp_path, negatives):
    overrides = ["loss=sampled_softmax", "loss.num_negatives=16", f"loss.negatives={negatives}"]
    cfg = compose_config(TINY + overrides + ["eval.valid_users=50", "eval.item_chunk=64", "model=sasrec"], tmp_path)
    results = run(cfg)
    test = {k: v for k, v in results.items() if k.startswith("test/")} or results.get("test", {})
    assert test, results.keys()
    assert all(math.isfinite(v) for v in test.values())


def test_an_unknown_negatives_mode_is_refused_before_the_run(tmp_path):
    from seqrec.errors import SeqrecError

    cfg = compose_config(TINY + ["loss=sampled_softmax", "loss.negatives=popular"], tmp_path)
    with pytest.raises(SeqrecError, match="loss.negatives"):
        run(cfg)
