"""Large catalogues: full-CE memory, training-step cost against catalogue size, full-ranking evaluation time.

    python bench/bench_catalog.py [--parts ce_memory,step,eval] [--out bench/results/catalog.json]

ce_memory  peak RSS of one `loss=ce` training step (SASRec, hidden 64, batch 128 x maxlen 50, Adam), each size in
           a fresh subprocess (--ce-items, default 10^6), so the figure is that step's and nothing else's.
step       time of one sampled-softmax training step (256 negatives per sequence, the same tokens) at --small-items
           and --large-items: the product's `Trainer.train_step`, built from the composed config (seqrec.compose),
           with optimizer=adam (dense item-table gradient) and optimizer=lazy_adam (sparse gradient, the rows a batch
           touches updated); the ratio large/small is the catalogue's cost per step.
eval       full-ranking test evaluation of --eval-users users over --eval-items items (random histories of
           --history items), exact ranks with the item-chunked evaluator; validation on eval.valid_users users;
           and, on --before-users users, the previous materialised (users x items) ranking for a same-machine ratio.
           A user leaves the item loop once max(ks) items beat its target, so an untrained model (every target far
           down) is the cheapest case; --hits 0.3 puts the target on top for 30 % of the users, who are scored
           against the whole catalogue, as a trained model's hits are.

Prints a table and writes JSON. Random data and an untrained model: the figures are costs, not metrics.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from seqrec.models.sasrec import SASRec  # noqa: E402

BATCH, MAXLEN, HIDDEN = 128, 50, 64


def make_model(num_items: int, maxlen: int = MAXLEN) -> SASRec:
    torch.manual_seed(0)
    return SASRec(num_items=num_items, maxlen=maxlen, hidden_units=HIDDEN, num_blocks=2, num_heads=1, dropout_rate=0.2)


def random_batch(num_items: int, negatives: int, seed: int = 0):
    """(B, L) inputs and targets over the whole catalogue, (B, N) negatives: the same tokens at every size."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items + 1, (BATCH, MAXLEN), generator=g)
    pos = torch.randint(1, num_items + 1, (BATCH, MAXLEN), generator=g)
    neg = torch.randint(1, num_items + 1, (BATCH, negatives), generator=g) if negatives else None
    return seq, pos, neg


# --- ce_memory ----------------------------------------------------------------------------------------------------


def ce_step_child(num_items: int) -> None:
    """One loss=ce training step; prints its peak RSS in MiB (run in a fresh process)."""
    from seqrec.train.losses import CrossEntropy

    model = make_model(num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    seq, pos, _ = random_batch(num_items, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    loss = CrossEntropy()(model(seq), model.head, pos, None)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"items": num_items, "peak_rss_mib": peak, "rss_before_step_mib": before, "step_s": seconds}))


def ce_memory(sizes: list[int]) -> list[dict]:
    rows = []
    for num_items in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--ce-child", str(num_items)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        # what saving the (positions, items) float32 probabilities for the backward would add
        row["saved_probabilities_mib"] = BATCH * MAXLEN * num_items * 4 / 2**20
        rows.append(row)
        print(
            f"ce_memory  items {num_items:>9,}  peak RSS {row['peak_rss_mib']:>8.0f} MiB  step {row['step_s']:.1f} s"
            f"   (saved probabilities would add {row['saved_probabilities_mib']:,.0f} MiB)"
        )
    return rows


# --- step ---------------------------------------------------------------------------------------------------------


STEP_OPTIMIZERS = {"adam": "dense grad + Adam", "lazy_adam": "sparse grad + lazy Adam"}


def product_config(optimizer: str, negatives: int, output_dir: str):
    """The composed run config of the timed step: SASRec (plain residual, hidden 64, 2 blocks, 1 head, maxlen 50),
    sampled softmax with `negatives` per sequence, `optimizer=adam|lazy_adam`, on the CPU in float32."""
    from hydra import compose, initialize_config_dir

    import seqrec.launch  # noqa: F401  (the ${seqrec.*:} resolvers, as train.py registers them)

    overrides = [
        "hardware=cpu",
        "model=sasrec",
        "residual=plain",
        f"model.maxlen={MAXLEN}",
        f"model.hidden_units={HIDDEN}",
        "model.num_blocks=2",
        "model.num_heads=1",
        "model.dropout_rate=0.2",
        "loss=sampled_softmax",
        f"loss.num_negatives={negatives}",
        f"optimizer={optimizer}",
        f"sampler.batch_size={BATCH}",
        f"trainer.output_dir={output_dir}",
        f"logger.output_dir={output_dir}",
        "trainer.progress=false",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class FixedLength:
    """The sampler a Trainer is built with, reduced to what the step needs from it: an epoch length."""

    def __len__(self) -> int:
        return 1000


def step_setup(num_items: int, optimizer: str, negatives: int, output_dir: str):
    """The product's Trainer (seqrec.compose.build_trainer) over a model of `num_items` items; its `train_step` is
    what a run calls per batch (forward, loss, backward, optimizer and schedule steps)."""
    from seqrec.compose import build_node, build_trainer, set_process_flags
    from seqrec.utils.config import check_config

    cfg = product_config(optimizer, negatives, output_dir)
    check_config(cfg)  # the combination a user would get: refused ones are not benchmarked
    set_process_flags(cfg)  # deterministic kernels, as every run
    torch.manual_seed(0)
    model = build_node(cfg.model, num_items=num_items)
    loss = build_node(cfg.loss)
    return build_trainer(cfg, model=model, sampler=FixedLength(), evaluator=None, loss=loss, logger=None)


def one_step(trainer, batch) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_cost(small: int, large: int, steps: int, negatives: int) -> list[dict]:
    """Median step time of each (optimizer, size) setup; the setups take turns step by step, so the machine's
    noise (other processes on shared cores) hits them alike."""
    import tempfile

    from seqrec.train.sampler import Batch

    output_dir = tempfile.mkdtemp(prefix="bench_catalog_")  # the trainers' run directory; a step writes nothing
    setups = {(opt, n): step_setup(n, opt, negatives, output_dir) for opt in STEP_OPTIMIZERS for n in (small, large)}
    seconds = {key: ([], []) for key in setups}
    for step in range(steps + 1):  # the first step (allocations, optimizer state) is not timed
        for (opt, n), trainer in setups.items():
            seq, pos, neg = random_batch(n, negatives, seed=step)
            elapsed = one_step(trainer, Batch(seq=seq, pos=pos, neg=neg))
            if step:
                for times, value in zip(seconds[(opt, n)], elapsed):
                    times.append(value)
    rows = []
    for opt, name in STEP_OPTIMIZERS.items():
        (small_s, small_cpu), (large_s, large_cpu) = (
            tuple(statistics.median(t) for t in seconds[(opt, n)]) for n in (small, large)
        )
        rows.append(
            {"variant": name, "optimizer": opt, "small_items": small, "large_items": large}
            | {"small_step_s": small_s, "large_step_s": large_s, "ratio": large_s / small_s}
            | {"small_step_cpu_s": small_cpu, "large_step_cpu_s": large_cpu, "cpu_ratio": large_cpu / small_cpu}
        )
        print(
            f"step       optimizer={opt:10s} {name:24s} {small:>9,} items {small_s * 1e3:7.1f} ms   {large:>9,} items "
            f"{large_s * 1e3:7.1f} ms   x{large_s / small_s:.2f} (CPU time x{large_cpu / small_cpu:.2f})"
        )
    return rows


# --- eval ---------------------------------------------------------------------------------------------------------


def random_data(num_users: int, num_items: int, history: int):
    from seqrec.data.dataset import split_leave_one_out

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(num_users), history)
    items = rng.integers(1, num_items + 1, size=num_users * history)
    return split_leave_one_out("catalog", users, items, None, np.arange(num_users), np.arange(num_items + 1))


class MaterialisedRanking:
    """The previous full ranking: score_all over the whole catalogue, then one comparison over it."""

    @staticmethod
    def full_ranks(evaluator, head, h, users, target, target_scores, split):
        from seqrec.eval.metrics import rank_of_target

        scores = head.score_all(h)  # (b, I)
        scores[torch.arange(len(users)), target - 1] = -torch.inf
        if evaluator.filter_seen:
            r, items = evaluator._seen(users, split)
            scores[r, items - 1] = -torch.inf
        return rank_of_target(scores, target_scores)


def hits_evaluator(evaluator_cls, fraction: float):
    """An evaluator whose model puts the target on top for `fraction` of the users (chosen by user id), as a trained
    model does for its hits: those users cannot leave the item loop early, so this is the cost a trained model sees."""

    class WithHits(evaluator_cls):
        def _last_hidden(self, model, users, split, device):
            h = super()._last_hidden(model, users, split, device)  # (b, D)
            target = torch.from_numpy((self.data.valid_item if split == "valid" else self.data.test_item)[users])
            hit = torch.from_numpy(users % 1000 < fraction * 1000)
            return torch.where(hit[:, None], 10 * model.head.weight[target].float(), h)

    return WithHits


def timed_evaluation(evaluator, model, split: str) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, metrics): CPU seconds are the fairer figure on a shared machine."""
    start, cpu = time.perf_counter(), time.process_time()
    metrics = evaluator.evaluate(model, split)
    return time.perf_counter() - start, time.process_time() - cpu, metrics


def eval_cost(
    num_users: int, num_items: int, history: int, valid_users: int, before_users: int, chunk: int, hits: float
):
    from seqrec.eval.evaluator import Evaluator

    if hits > 0:
        Evaluator = hits_evaluator(Evaluator, hits)  # noqa: N806

    data = random_data(num_users, num_items, history)
    model = make_model(num_items)
    kwargs = dict(ks=[10], maxlen=MAXLEN, batch_size=512, item_chunk=chunk)
    rows = [
        {"what": f"test, all {num_users:,} users", "users": num_users, "seconds": None},
        {"what": f"valid, eval.valid_users={valid_users}", "users": valid_users, "seconds": None},
    ]

    def timed(row: dict, evaluator, split: str) -> None:
        row["seconds"], row["cpu_seconds"], row["metrics"] = timed_evaluation(evaluator, model, split)
        print(f"eval       {row['what']:40s} {row['seconds']:7.1f} s  ({row['cpu_seconds']:.1f} s CPU)", flush=True)

    timed(rows[1], Evaluator(data, valid_users=valid_users, **kwargs), "valid")
    if before_users:
        now = Evaluator(data, valid_users=before_users, **kwargs)
        before = Evaluator(data, valid_users=before_users, **kwargs)
        before._full_ranks = lambda *a: MaterialisedRanking.full_ranks(before, *a)
        for name, ev in (("chunked", now), ("materialised (before)", before)):
            rows.append({"what": f"valid {before_users:,} users, {name}", "users": before_users})
            timed(rows[-1], ev, "valid")
    timed(rows[0], Evaluator(data, **kwargs), "test")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ce_memory,step,eval")
    parser.add_argument("--ce-items", default="1000000", help="comma-separated catalogue sizes for ce_memory")
    parser.add_argument("--small-items", type=int, default=30_000)
    parser.add_argument("--large-items", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--eval-users", type=int, default=100_000)
    parser.add_argument("--eval-items", type=int, default=729_000)
    parser.add_argument("--history", type=int, default=50, help="interactions per user in the eval data")
    parser.add_argument("--valid-users", type=int, default=10_000)
    parser.add_argument("--before-users", type=int, default=2_000, help="0: skip the materialised comparison")
    parser.add_argument("--item-chunk", type=int, default=8192)
    parser.add_argument("--hits", type=float, default=0.0, help="fraction of users whose target the model puts on top")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "catalog.json"))
    parser.add_argument("--ce-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ce_child:
        ce_step_child(args.ce_child)
        return
    parts = args.parts.split(",")
    result = {"command": " ".join(sys.argv), "threads": torch.get_num_threads()}
    if "ce_memory" in parts:
        result["ce_memory"] = ce_memory([int(n) for n in args.ce_items.split(",")])
    if "step" in parts:
        result["step"] = step_cost(args.small_items, args.large_items, args.steps, args.negatives)
    if "eval" in parts:
        result["eval"] = eval_cost(
            args.eval_users,
            args.eval_items,
            args.history,
            args.valid_users,
            args.before_users,
            args.item_chunk,
            args.hits,
        )
    print(f"{torch.get_num_threads()} thread(s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
