"""Keys added after a run was recorded: the run resumes under the value that does what the code did then, and a
different value is refused in one line."""

from __future__ import annotations

import pytest

from seqrec.errors import CheckpointError
from seqrec.train.resume_policy import check_resume, config_differences

RECORDED = {  # a run recorded before dataset.duplicates / dataset.split / eval.valid_users existed
    "seed": 1,
    "dataset": {"_target_": "seqrec.data.dataset.from_file", "path": "x.txt"},
    "eval": {"protocol": "full", "ks": [10]},
}


def today(**changes) -> dict:
    config = {
        "seed": 1,
        "dataset": {"_target_": "seqrec.data.dataset.from_file", "path": "x.txt", "duplicates": "keep"},
        "eval": {"protocol": "full", "ks": [10], "valid_users": 0, "item_chunk": 8192},
    }
    config["dataset"]["split"] = "leave-one-out"
    for key, value in changes.items():
        node, leaf = key.split("__")
        config[node][leaf] = value
    return config


def test_new_keys_at_their_former_behaviour_resume():
    assert config_differences(RECORDED, today()) == []
    check_resume(RECORDED, today(), "run")


def test_a_new_key_at_another_value_is_refused_in_one_line():
    with pytest.raises(CheckpointError) as error:
        check_resume(RECORDED, today(dataset__duplicates="drop", eval__valid_users=1000), "run")
    message = str(error.value)
    assert "\n" not in message
    assert "dataset.duplicates: 'keep' -> 'drop'" in message and "eval.valid_users: 0 -> 1000" in message


def test_an_implementation_key_added_since_may_take_any_value():
    assert config_differences(RECORDED, today(eval__item_chunk=64)) == []
