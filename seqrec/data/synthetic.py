"""The bundled default dataset: seeded synthetic sequences whose next item depends on the last time gap.

Structure (all drawn from one `numpy.random.Generator(seed)`, so the same seed gives the same data):

1. Popularity: item i has weight 1 / rank(i) ** zipf_exponent (Zipf, exponent ~1) over a random ranking.
2. Two fixed successor maps `succ_fast`, `succ_slow` (item -> item, targets drawn by popularity, never equal).
3. Time: every gap between consecutive interactions is, i.i.d. with probability `p_short`, "short"
   (exponential, mean `short_gap_minutes`) or else "long" (exponential, mean `long_gap_days`).
   Each user starts at 2020-01-01 plus a random offset of up to a year.
4. Next item: after x_t, with probability `p_pattern` the next item is `succ_fast[x_t]` if the gap between
   x_{t-1} and x_t (the most recent gap, visible in the history) was short, else `succ_slow[x_t]`; otherwise it
   is a popularity draw, from the user's own topic with probability `topic_strength`. The first two items of a
   sequence are plain draws.

So a model that ignores time can at best split its bet between the two successors of the last item, while a
time-aware model (TiSASRec) can read the last gap and tell which successor comes next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPOCH = 1577836800  # 2020-01-01 00:00:00 UTC


@dataclass(frozen=True)
class Synthetic:
    """Raw generated interactions (grouped by user, chronological) plus the ground-truth structure for tests."""

    users: np.ndarray  # (N,) int64 users 0..U-1, grouped, ascending
    items: np.ndarray  # (N,) int64 items 1..I
    times: np.ndarray  # (N,) int64 unix seconds, strictly increasing within a user
    succ_fast: np.ndarray  # (I+1,) int64 successor after a short gap ([0] unused)
    succ_slow: np.ndarray  # (I+1,) int64 successor after a long gap ([0] unused)
    popularity: np.ndarray  # (I+1,) float64 draw probabilities ([0] = 0)
    short_gap: np.ndarray  # (N,) bool: the gap before this interaction was short (False for first items)


def generate(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    seed: int = 0,
    mean_length: float = 50.0,
    min_length: int = 5,
    max_length: int = 200,
    zipf_exponent: float = 1.0,
    p_pattern: float = 0.75,
    p_short: float = 0.5,
    short_gap_minutes: float = 10.0,
    long_gap_days: float = 2.0,
    num_topics: int = 20,
    topic_strength: float = 0.5,
) -> Synthetic:
    """Generate the synthetic interactions (arguments as in `seqrec.data.dataset.synthetic`)."""
    if num_users < 1 or num_items < 3:
        raise ValueError("synthetic data needs num_users >= 1 and num_items >= 3")
    if not 1 <= min_length <= max_length:
        raise ValueError("synthetic data needs 1 <= min_length <= max_length")
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

    # 2. Successor maps by popularity, succ_fast[x] != succ_slow[x] and neither equals x.
    items_all = np.arange(1, num_items + 1)
    succ_fast, succ_slow = draw(num_items), draw(num_items)
    for _ in range(100):
        bad = (succ_fast == items_all) | (succ_fast == succ_slow)
        succ_fast[bad] = draw(int(bad.sum()))
        bad2 = (succ_slow == items_all) | (succ_fast == succ_slow)
        succ_slow[bad2] = draw(int(bad2.sum()))
        if not (bad.any() or bad2.any()):
            break
    succ_fast = np.concatenate([[0], succ_fast]).astype(np.int64)
    succ_slow = np.concatenate([[0], succ_slow]).astype(np.int64)

    # Sequence lengths: lognormal with the requested mean, clipped.
    sigma = 0.6
    mu = np.log(mean_length) - sigma**2 / 2
    lengths = np.clip(np.rint(rng.lognormal(mu, sigma, num_users)), min_length, max_length).astype(np.int64)
    user_topic = rng.integers(num_topics, size=num_users)
    T = int(lengths.max())

    # 3. Gaps: short[u, t] tells whether the gap between x_{t-1} and x_t was short (t >= 1).
    short = rng.random((num_users, T)) < p_short
    short[:, 0] = False
    gap = np.where(
        short,
        rng.exponential(short_gap_minutes * 60.0, (num_users, T)),
        rng.exponential(long_gap_days * 86400.0, (num_users, T)),
    )
    gap = np.floor(gap).astype(np.int64) + 1  # >= 1 s, so timestamps are strictly increasing
    gap[:, 0] = EPOCH + rng.integers(0, 365 * 86400, size=num_users)
    times = np.cumsum(gap, axis=1)

    # 4. Items, one step for all users at a time.
    x = np.zeros((num_users, T), dtype=np.int64)
    follow = rng.random((num_users, T)) < p_pattern
    from_topic = rng.random((num_users, T)) < topic_strength
    for t in range(T):
        n_pop = num_users
        fresh = np.where(from_topic[:, t], draw_topic(user_topic), draw(n_pop))
        if t >= 2:
            prev = x[:, t - 1]
            succ = np.where(short[:, t - 1], succ_fast[prev], succ_slow[prev])
            x[:, t] = np.where(follow[:, t], succ, fresh)
        else:
            x[:, t] = fresh

    valid = np.arange(T)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    return Synthetic(
        users=users,
        items=x[valid],
        times=times[valid],
        succ_fast=succ_fast,
        succ_slow=succ_slow,
        popularity=popularity,
        short_gap=short[valid],
    )
