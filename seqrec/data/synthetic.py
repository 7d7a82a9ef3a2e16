"""The bundled default dataset: seeded synthetic sequences with a habit that only the timestamps can locate.

Structure (all drawn from one `numpy.random.Generator(seed)`, so the same seed gives the same data):

1. Popularity: item i has weight 1 / rank(i) ** zipf_exponent (Zipf, exponent ~1) over a random ranking, and
   each user has a topic that some of the popularity draws come from.
2. Two fixed item -> item maps: `succ`, the last-item successor (targets uniform, so that its hits are not the
   items a popularity baseline already ranks first), and `succ_habit`, a single random cycle through all items (a
   permutation without fixed points: its targets are spread evenly and a chain of habits does not come back to an
   item soon). succ[x] != succ_habit[x] != x.
3. Time: gaps between consecutive interactions are i.i.d. gamma (shape 2, mean `mean_gap_hours`).
   Each user starts at 2020-01-01 plus a random offset of up to a year.
4. Next item after x_1..x_n (times s_1..s_n):
   - with probability `p_habit`, the "a day ago" habit: the anchor is the latest x_j with s_j <= s_n - lag
     (lag = `habit_lag_hours`; s_n is the time of the current, last-seen item, not of the next one, which a
     model does not know), and the next item is succ_habit[x_j], unless the user has already consumed it (then,
     and when there is no anchor yet, the rule below applies instead);
   - otherwise, with probability `p_pattern`, succ[x_n]; else a popularity draw, from the user's own topic with
     probability `topic_strength`. The first item is a plain draw.

Why this shape: the gaps are random, so the anchor lies a varying number of steps back (2-7 in most cases at the
defaults) and a model that only sees positions (SASRec) can at best spread its bet over the habit successors of
the last several items. TiSASRec's attention from the query n to the key j sees the interval |s_n - s_j| in hour
buckets (model.time_span=100 > 24 + a few gaps), so it can attend to the latest key at >= 24 h and read its item.
The "unless already consumed" clause keeps the planted targets rankable under eval.filter_seen (and stops a habit
from repeating the item it produced one step earlier when no new interaction crossed the 24 h line). Popularity,
topics and `succ` keep the part that SASRec can learn from positions alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqrec.errors import ConfigError
from seqrec.utils.rules import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, at_least, config_rules, violation

EPOCH = 1577836800  # 2020-01-01 00:00:00 UTC

RULE_DRAW, RULE_SUCC, RULE_HABIT = 0, 1, 2  # values of Synthetic.rule


@dataclass(frozen=True)
class Synthetic:
    """Raw generated interactions (grouped by user, chronological) plus the ground-truth structure for tests."""

    users: np.ndarray  # (N,) int64 users 0..U-1, grouped, ascending
    items: np.ndarray  # (N,) int64 items 1..I
    times: np.ndarray  # (N,) int64 unix seconds, strictly increasing within a user
    succ: np.ndarray  # (I+1,) int64 last-item successor ([0] unused)
    succ_habit: np.ndarray  # (I+1,) int64 successor of the anchor item ([0] unused)
    popularity: np.ndarray  # (I+1,) float64 draw probabilities ([0] = 0)
    rule: np.ndarray  # (N,) int8 which rule produced this interaction: RULE_DRAW, RULE_SUCC or RULE_HABIT
    habit_lag_seconds: int  # the habit's lag: the anchor is the latest interaction at least this long before


# Each argument's rule (what the generator needs), named as the config keys `dataset.<name>` that set them.
@config_rules(
    num_users=at_least(1),
    num_items=at_least(3, "the item -> successor maps need three distinct items"),
    seed=NON_NEGATIVE,
    mean_length=POSITIVE,
    min_length=at_least(1),
    max_length=at_least(1),
    zipf_exponent=NON_NEGATIVE,
    p_habit=UNIT_INTERVAL,
    habit_lag_hours=POSITIVE,
    mean_gap_hours=POSITIVE,
    p_pattern=UNIT_INTERVAL,
    num_topics=at_least(1),
    topic_strength=UNIT_INTERVAL,
)
def generate(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    seed: int = 0,
    mean_length: float = 50.0,
    min_length: int = 5,
    max_length: int = 200,
    zipf_exponent: float = 1.0,
    p_habit: float = 0.6,
    habit_lag_hours: float = 24.0,
    mean_gap_hours: float = 6.0,
    p_pattern: float = 0.5,
    num_topics: int = 20,
    topic_strength: float = 0.5,
) -> Synthetic:
    """Generate the synthetic interactions (arguments as in `seqrec.data.dataset.synthetic`)."""
    _check_arguments(locals())  # at this point locals() holds exactly the arguments
    rng = np.random.default_rng(seed)
    num_topics = max(1, min(int(num_topics), num_items))

    # 1. Zipf popularity over a random ranking of the items.
    rank = rng.permutation(num_items) + 1
    weight = 1.0 / rank.astype(np.float64) ** zipf_exponent
    popularity = np.concatenate([[0.0], weight / weight.sum()])
    cdf = np.cumsum(popularity[1:])
    cdf[-1] = 1.0

    def draw(n: int) -> np.ndarray:
        return np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64) + 1

    # Topics: items sorted by topic; within a topic, CDF values lie in [k, k + 1) so one searchsorted serves all.
    topic = rng.integers(num_topics, size=num_items)
    by_topic = np.lexsort((np.arange(num_items), topic))
    topic_sorted = topic[by_topic]
    w = weight[by_topic]
    topic_total = np.bincount(topic_sorted, weights=w, minlength=num_topics)
    within = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(topic_total)[:-1]])[topic_sorted]
    topic_cdf = topic_sorted + within / np.where(topic_total > 0, topic_total, 1.0)[topic_sorted]
    topic_items = by_topic + 1

    def draw_topic(t: np.ndarray) -> np.ndarray:
        u = t + rng.random(len(t)) * (1 - 1e-12)
        idx = np.minimum(np.searchsorted(topic_cdf, u, side="right"), num_items - 1)
        return topic_items[idx]

    # 2. succ_habit: one cycle through a random order of all items (a bijection with no fixed point).
    order = rng.permutation(num_items) + 1
    succ_habit = np.zeros(num_items + 1, dtype=np.int64)
    succ_habit[order] = np.roll(order, -1)
    # succ: uniform (not by popularity, which would hand its hits to a popularity baseline), never x itself nor
    # x's habit successor (so each rule's hits can be told apart).
    items_all = np.arange(1, num_items + 1)
    succ = rng.integers(1, num_items + 1, size=num_items)
    for _ in range(100):
        bad = (succ == items_all) | (succ == succ_habit[1:])
        if not bad.any():
            break
        succ[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()))
    else:  # vanishingly unlikely unless the catalogue is tiny: take the item two steps along the habit cycle
        succ[bad] = succ_habit[succ_habit[1:]][bad]
    succ = np.concatenate([[0], succ]).astype(np.int64)

    # Sequence lengths: lognormal with the requested mean, clipped.
    sigma = 0.6
    mu = np.log(mean_length) - sigma**2 / 2
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, num_users)), min_length, max_length).astype(np.int64)
    user_topic = rng.integers(num_topics, size=num_users)
    T = int(lengths.max())

    # 3. Gaps: gamma with shape 2 (fewer near-zero gaps than an exponential, yet a widely varying step count per
    # day), at least 1 s so that timestamps are strictly increasing.
    gap = np.floor(rng.gamma(2.0, mean_gap_hours * 3600.0 / 2.0, (num_users, T))).astype(np.int64) + 1
    gap[:, 0] = EPOCH + rng.integers(0, 365 * 86400, size=num_users)
    times = np.cumsum(gap, axis=1)

    # anchor[u, t]: the latest position j <= t with times[u, j] <= times[u, t] - lag, or -1. One searchsorted for
    # all users: offsetting each row by u * stride (> any time) makes the flattened matrix globally sorted.
    lag = int(round(habit_lag_hours * 3600))
    stride = int(times.max()) + lag + 1
    flat = (times + np.arange(num_users, dtype=np.int64)[:, None] * stride).ravel()
    anchor = np.searchsorted(flat, flat - lag, side="right").reshape(num_users, T) - 1
    anchor -= np.arange(num_users, dtype=np.int64)[:, None] * T
    anchor[anchor < 0] = -1  # the search fell into the previous user's row: nothing that early yet

    # 4. Items, one step for all users at a time: x[:, t] from the history x[:, :t], whose current item is t - 1.
    x = np.zeros((num_users, T), dtype=np.int64)
    rule = np.zeros((num_users, T), dtype=np.int8)
    habit = rng.random((num_users, T)) < p_habit
    follow = rng.random((num_users, T)) < p_pattern
    from_topic = rng.random((num_users, T)) < topic_strength
    for t in range(T):
        fresh = np.where(from_topic[:, t], draw_topic(user_topic), draw(num_users))
        if t == 0:
            x[:, 0] = fresh
            continue
        last = x[:, t - 1]
        x[:, t] = np.where(follow[:, t], succ[last], fresh)
        rule[:, t] = np.where(follow[:, t], RULE_SUCC, RULE_DRAW)
        a = anchor[:, t - 1]
        cand = np.flatnonzero(habit[:, t] & (a >= 0))
        target = succ_habit[x[cand, a[cand]]]
        new = ~(x[cand, :t] == target[:, None]).any(axis=1)  # the habit only brings items not consumed yet
        cand, target = cand[new], target[new]
        x[cand, t] = target
        rule[cand, t] = RULE_HABIT

    valid = np.arange(T)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    return Synthetic(
        users=users,
        items=x[valid],
        times=times[valid],
        succ=succ,
        succ_habit=succ_habit,
        popularity=popularity,
        rule=rule[valid],
        habit_lag_seconds=lag,
    )


def _check_arguments(args: dict) -> None:
    """Raise one ConfigError listing every argument that breaks its rule (as `dataset.<name>=<value>`)."""
    problems = [violation(f"dataset.{name}", args[name], rule) for name, rule in generate.RULES.items()]
    problems = [p for p in problems if p]
    if not problems and args["min_length"] > args["max_length"]:
        problems.append(f"dataset.min_length={args['min_length']}: must be <= dataset.max_length={args['max_length']}")
    if problems:
        raise ConfigError("invalid synthetic data settings: " + "; ".join(problems))


def power_law_interactions(
    num_users: int, num_items: int, num_rows: int, seed: int = 0, zipf_exponent: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interaction rows shaped like a large public log, for scale benchmarks: every user active, item popularity
    ~ 1 / rank ** zipf_exponent, rows grouped by user with increasing timestamps (like ML-20M's ratings file).

    Returns:
        (users, items, times): (num_rows,) int64 each; users 1..num_users, items 1..num_items (raw ids).
    """
    if num_rows < 3 * num_users:
        raise ValueError("num_rows must allow >= 3 interactions per user")
    rng = np.random.default_rng(seed)
    extra = rng.multinomial(num_rows - 3 * num_users, rng.dirichlet(np.full(num_users, 0.5)))
    users = np.repeat(np.arange(1, num_users + 1, dtype=np.int64), 3 + extra)  # (num_rows,)
    weights = 1.0 / np.arange(1, num_items + 1) ** zipf_exponent
    cdf = np.cumsum(weights / weights.sum())
    items = np.searchsorted(cdf, rng.random(num_rows), side="right").clip(max=num_items - 1) + 1
    times = 1_000_000_000 + rng.integers(0, 300_000_000, size=num_rows)  # about 10 years
    return users, items.astype(np.int64), times.astype(np.int64)
