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


# --- optimizer=lazy_adam: sparse item-table gradients, rows updated when touched ----------------------------------

LAZY = TINY + ["optimizer=lazy_adam", "loss=sampled_softmax", "loss.num_negatives=16", "model=sasrec"]


def _final_state(run_dir, extra=()):
    import json

    import torch

    run(compose_config(LAZY + ["trainer.num_epochs=4", *extra], run_dir))
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return state, json.loads((run_dir / "results.json").read_text())


def test_lazy_adam_trains_on_sparse_item_gradients_and_resumes_exactly(tmp_path):
    import torch

    cfg = compose_config(LAZY, tmp_path / "a")
    assert cfg.model.sparse_embedding is True  # the optimizer option turns the table's sparse gradient on
    unbroken, unbroken_results = _final_state(tmp_path / "a")
    assert all(math.isfinite(v) for k, v in unbroken_results.items() if k.startswith("test/"))
    assert type(unbroken["optimizer"]["state"][0]["step"]) is torch.Tensor  # Adam's state layout
    run(compose_config(LAZY + ["trainer.num_epochs=2"], tmp_path / "b"))  # "killed" after 2 epochs
    resumed, resumed_results = _final_state(tmp_path / "b")  # same dir, resume=auto
    for name, tensor in unbroken["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("val/ndcg@10", "test/ndcg@10", "best_epoch", "epochs_run", "steps"):
        assert unbroken_results[key] == resumed_results[key], key


def test_lazy_adam_under_several_nccl_ranks_is_refused_before_the_run(tmp_path):
    from seqrec.errors import ConfigError
    from seqrec.utils.config import check_config

    cfg = compose_config(LAZY + ["trainer.devices=2", "distributed.backend=nccl"], tmp_path)
    with pytest.raises(ConfigError, match=r"^invalid config: trainer.devices=2 with model.sparse_embedding=true: NCCL"):
        check_config(cfg)
    check_config(compose_config(LAZY + ["trainer.devices=2", "distributed.backend=gloo"], tmp_path))
