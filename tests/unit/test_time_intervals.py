"""Interval buckets R[i, j] = min(span, floor(|t_i - t_j| / unit)) against hand-worked examples."""

import pytest
import torch

from seqrec.models.time_intervals import interval_buckets

T0 = 1_600_000_000  # a realistic unix time: differences, not absolute values, must matter


def buckets(times, unit, span=100, scale=None, valid=None):
    times = torch.tensor([times], dtype=torch.int64)
    valid = times != 0 if valid is None else torch.tensor([valid])
    scale = None if scale is None else torch.tensor([scale])
    return interval_buckets(times, valid, unit, span, scale)[0].tolist()


@pytest.mark.parametrize(
    "unit, offsets, expected_row",  # row of the last item: its bucket against every item
    [
        # gaps to the last item: 200 s, 90 s, 59 s, 0 s
        ("second", [0, 110, 141, 200], [100, 90, 59, 0]),  # 200 s clips at span 100
        ("minute", [0, 110, 141, 200], [3, 1, 0, 0]),  # floor(200/60)=3, floor(90/60)=1, floor(59/60)=0
        # gaps: 7,200 s, 7,199 s, 3,600 s, 0 s
        ("hour", [0, 1, 3_600, 7_200], [2, 1, 1, 0]),  # floor, not round: 7,199 s is 1 hour
        # gaps: 3 days, 1 day + 1 s, 1 day - 1 s, 0
        ("day", [0, 172_799, 172_801, 259_200], [3, 1, 0, 0]),
    ],
)
def test_every_unit_floors_the_absolute_gap(unit, offsets, expected_row):
    R = buckets([T0 + o for o in offsets], unit)
    assert R[-1] == expected_row
    assert R == [list(r) for r in zip(*R)]  # symmetric
    assert all(R[i][i] == 0 for i in range(len(R)))


def test_personal_unit_divides_by_the_users_min_gap():
    # user with min consecutive gap 30 s: gaps to the last item 95 s -> 3, 65 s -> 2, 30 s -> 1
    R = buckets([T0, T0 + 30, T0 + 65, T0 + 95], "personal", scale=30)
    assert R[-1] == [3, 2, 1, 0]
    assert R[1] == [1, 0, 1, 2]


def test_personal_scale_is_per_user_and_at_least_one():
    times = torch.tensor([[T0, T0 + 10], [T0, T0 + 10], [T0, T0 + 10]])
    scale = torch.tensor([5, 10, 0])  # 0 (no non-zero gap) counts as 1
    R = interval_buckets(times, times != 0, "personal", 100, scale)
    assert R[:, 1, 0].tolist() == [2, 1, 10]


def test_ties_fall_in_bucket_zero():
    R = buckets([T0, T0, T0 + 3_600, T0 + 3_600], "hour")
    assert R == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_unsorted_timestamps_use_the_absolute_gap():
    # the 2nd event is older than the 1st: |gap| counts, so order never gives negative buckets
    R = buckets([T0 + 7_200, T0, T0 + 3_600], "hour")
    assert R == [[0, 2, 1], [2, 0, 1], [1, 1, 0]]


def test_huge_gaps_clip_at_span_without_overflow():
    # 0 and 2**62 are 4.6e18 s apart: int32 arithmetic would wrap; the result must be the clip value
    R = buckets([1, 2**62, 2**62 + 5], "second", span=7)
    assert R == [[0, 7, 7], [7, 0, 5], [7, 5, 0]]
    R = buckets([T0, T0 + 50 * 365 * 86_400], "day", span=256)  # 50 years, k = 256 needs more than uint8
    assert R[1][0] == 256


def test_padding_pairs_get_bucket_zero_and_window_can_be_trimmed():
    R = buckets([0, 0, T0, T0 + 120], "minute")  # left padding has time 0
    assert R == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 2, 0]]
    assert buckets([T0, T0 + 120], "minute") == [[0, 2], [2, 0]]  # the trimmed window gives the same block


def test_validity_comes_from_the_mask_not_from_time_zero():
    # a real item at the epoch (time 0) is still real when valid says so
    R = buckets([0, 7_200], "hour", valid=[True, True])
    assert R == [[0, 2], [2, 0]]


def test_batch_shape_dtype_and_unknown_unit():
    times = torch.arange(1, 25, dtype=torch.int64).view(2, 12) * 1000
    R = interval_buckets(times, times != 0, "minute", 10)
    assert R.shape == (2, 12, 12) and R.dtype == torch.int64
    with pytest.raises(ValueError, match="time_unit"):
        interval_buckets(times, times != 0, "week", 10)
    with pytest.raises(ValueError, match="time_scale"):
        interval_buckets(times, times != 0, "personal", 10)
