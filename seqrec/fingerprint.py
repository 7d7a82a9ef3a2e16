"""The evaluation protocol of a run as one comparable record: two runs' metrics are comparable only when their
fingerprints are equal (same data, same split, same targets, same candidates, same metric definitions).

    protocol_fingerprint(data, evaluator_cfg) -> {"id": "3f9c...", "dataset": {...}, "split": {...}, ...}

`id` is a short hash over every other field, so `seqrec.compare` can group runs by one string; the other fields say
in words what differs when two ids do. Hashes are SHA-256 over the arrays' bytes in a fixed dtype (int64,
little-endian), so they do not depend on the platform or on how the arrays were built.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# how each user's interactions with equal timestamps are ordered before the split (seqrec.data.dataset.build)
TIE_BREAK = "stable sort by timestamp: equal timestamps keep file order (no timestamps: file order)"
RANK_TIES = "pessimistic: competitors scoring >= the target count against it"
METRICS = "hr@k=1[rank<k], ndcg@k=1[rank<k]/log2(rank+2), mrr@k=1[rank<k]/(rank+1), rank 0-based"
HASH_CHARS = 16


def array_hash(*arrays: np.ndarray | None) -> str:
    """SHA-256 (first HASH_CHARS hex digits) over int64 little-endian bytes of the arrays; None hashes as absent."""
    digest = hashlib.sha256()
    for a in arrays:
        if a is None:
            digest.update(b"<none>")
            continue
        a = np.ascontiguousarray(np.asarray(a), dtype="<i8")
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:HASH_CHARS]


def _cfg_get(cfg, key: str, default=None):
    """cfg[key] for a dict or a DictConfig (or any object with the attribute)."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def dataset_section(data) -> dict:
    """Content hash and counts of a SeqData: every interaction (train, valid, test targets) with its time."""
    return {
        "name": data.name,
        "users": int(data.num_users),
        "items": int(data.num_items),
        "interactions": int(data.num_interactions),
        "content_hash": array_hash(
            data.train_ptr,
            data.train_items,
            data.train_times,
            data.valid_item,
            data.valid_time,
            data.test_item,
            data.test_time,
        ),
    }


def split_section(data) -> dict:
    """The split rule (the dataset's own description when it has one) and hashes of its targets."""
    rule = getattr(data, "split_rule", None) or {"rule": "leave-one-out", "valid": "second last", "test": "last"}
    return {
        **rule,
        "tie_break": TIE_BREAK,
        "valid_targets": array_hash(data.valid_item),
        "test_targets": array_hash(data.test_item),
        "valid_users": int(np.count_nonzero(data.valid_item)),
        "test_users": int(np.count_nonzero(data.test_item)),
    }


def evaluation_section(evaluator_cfg) -> dict:
    """Protocol, candidates and metric definitions; sampled negatives' count and seed only where they are used."""
    protocol = str(_cfg_get(evaluator_cfg, "protocol", "full"))
    also_sampled = bool(_cfg_get(evaluator_cfg, "also_sampled", False))
    section = {
        "protocol": protocol,
        "filter_seen": bool(_cfg_get(evaluator_cfg, "filter_seen", True)) if protocol == "full" else None,
        "ks": [int(k) for k in _cfg_get(evaluator_cfg, "ks", (5, 10, 20))],
        "rank_ties": RANK_TIES,
        "metrics": METRICS,
    }
    if protocol == "sampled" or also_sampled:
        section["sampled"] = {
            "num_negatives": int(_cfg_get(evaluator_cfg, "num_negatives", 100)),
            "seed": int(_cfg_get(evaluator_cfg, "seed", 0)),
            "excluded": "every item of the user (train, valid, test)",
        }
    return section


def protocol_fingerprint(data, evaluator_cfg) -> dict:
    """The protocol a run's metrics were computed under (see the module docstring); JSON-serialisable.

    Args:
        data: the run's SeqData.
        evaluator_cfg: the `eval` config (DictConfig or dict): protocol, num_negatives, ks, filter_seen, seed.
    """
    body = {
        "dataset": dataset_section(data),
        "split": split_section(data),
        "evaluation": evaluation_section(evaluator_cfg),
    }
    return {"id": protocol_id(body), **body}


def protocol_id(body: dict) -> str:
    """Hash of a fingerprint without its `id` and without the sampled negatives' seed: the evaluator draws them from
    the run's seed, so the seeds of one setting face different negatives; that is seed variance, which the mean over
    seeds averages, not a different protocol (paired comparisons pair runs of equal seed, hence equal negatives)."""
    body = json.loads(json.dumps({k: v for k, v in body.items() if k != "id"}))
    body.get("evaluation", {}).get("sampled", {}).pop("seed", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:HASH_CHARS]


def describe(fingerprint: dict | None) -> str:
    """A short human label of a fingerprint: `<id> (<dataset> <users>u/<items>i, <split>, <protocol>)`."""
    if not fingerprint:
        return "unrecorded"
    d, s, e = fingerprint.get("dataset", {}), fingerprint.get("split", {}), fingerprint.get("evaluation", {})
    protocol = e.get("protocol", "?")
    if "sampled" in e:
        protocol += f"+{e['sampled'].get('num_negatives')}neg/seed{e['sampled'].get('seed')}"
    return f"{fingerprint.get('id', '?')} ({d.get('name', '?')} {d.get('users', '?')}u/{d.get('items', '?')}i, " + (
        f"{s.get('rule', '?')}, {protocol})"
    )


def _leaves(node, prefix: str = "") -> dict:
    """{"evaluation.filter_seen": True, ...} of a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def differing_fields(fingerprints: list[dict | None]) -> list[str]:
    """The fields (dotted, without `id` and the sampled seed) whose values are not the same in all fingerprints."""
    leaves = [_leaves(f or {}) for f in fingerprints]
    keys = sorted({k for leaf in leaves for k in leaf if k != "id" and k != "evaluation.sampled.seed"})
    return [k for k in keys if len({json.dumps(leaf.get(k), sort_keys=True) for leaf in leaves}) > 1]
