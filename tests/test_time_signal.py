"""On the bundled data, TiSASRec beats SASRec because the planted habit lives in the time gaps.

The bundled generator's habit (seqrec/data/synthetic.py): next item = the habit successor of what the user did at
least 24 h before the current item. The gaps are random, so the item lies 2-7 steps back; only the
interval buckets of TiSASRec's attention (hour units) tell which one it is.
"""

import pytest
import torch

from seqrec.run import run
from tests.conftest import TINY, compose_config

# The real config path, the default eval (full ranking, seen items filtered) and the model configs' own time
# settings (model.time_unit=hour, model.time_span=100), with the plain residual: the question is whether the time
# signal reaches the ranking, not the connection (mHC, the default, made each model 3x slower: 45 s against 15 s on
# one AVX2 core). About 35 s for the pair on one thread.
BUDGET = [
    *TINY,
    "residual=plain",
    "dataset.num_users=600",
    "dataset.num_items=300",
    "trainer.num_epochs=40",
    "trainer.eval_every=10",
    "optimizer.lr=0.005",
    "sampler.batch_size=64",
]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tisasrec_beats_sasrec_on_the_bundled_data(tmp_path, one_thread):
    ndcg = {
        m: run(compose_config(BUDGET + [f"model={m}"], tmp_path / m))["test/ndcg@10"] for m in ("sasrec", "tisasrec")
    }
    # Measured with this budget (test NDCG@10, SASRec / TiSASRec): run seed 42 (this test) 0.319 / 0.395; seeds 1,
    # 2, 3: 0.299 / 0.421, 0.296 / 0.427, 0.298 / 0.407; dataset.seed=1: 0.306 / 0.403. Gap 0.11 +- 0.02 (min
    # 0.076), so 0.05 leaves room for seed noise yet fails when the time signal does not reach the ranking:
    # TiSASRec with model.time_span=1 (every interval of an hour or more in one bucket) scored 0.314, SASRec's
    # level.
    assert ndcg["tisasrec"] > ndcg["sasrec"] + 0.05, ndcg
