"""Buckets: config checks, the official assignment rules, and the batch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from opensora_sdk.training.buckets import BUCKET_PRESETS, BucketBatchSampler, BucketConfig, parse_bucket_key

SMALL = {"240p": {51: (1.0, 2), 102: (1.0, 2)}, "144p": {1: (1.0, 4), 51: (1.0, 3)}}


def mixed_sizes(n=200, seed=0):
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        h, w = [(240, 426), (426, 240), (192, 192), (360, 640)][rng.integers(4)]
        sizes.append((int(rng.choice([1, 60, 120, 250])), h, w))
    return sizes


def test_presets_parse_with_resolutions_by_descending_pixels():
    for name in ("stage1", "stage2", "stage3"):
        b = BucketConfig(name)
        pixels = [b.pixels[r] for r in b.resolutions]
        assert pixels == sorted(pixels, reverse=True)
        assert b.batch_size(("144p", 51, "0.56")) == 51
        assert all(list(lengths) == sorted(lengths, reverse=True) for lengths in b.probs.values())
    assert BucketConfig("stage3").probs["480p"][408] == 0.0
    assert BucketConfig("stage1").probs["144p"][102] == (1.0, 0.33)
    assert set(BUCKET_PRESETS) == {"stage1", "stage2", "stage3"}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"999p": {51: (1.0, 2)}}, "resolution '999p' is unknown"),
        ({"240p": {51: (1.5, 2)}}, r"keep_prob 1.5 is not allowed"),
        ({"240p": {51: ((1.0, 2.0), 2)}}, r"keep_prob \(1.0, 2.0\) is not allowed"),
        ({"240p": {51: (1.0, 0)}}, "batch_size 0 is not allowed"),
        ({"240p": {51: (0.5, None)}}, "batch_size None is not allowed"),
        ({"240p": {"lots": (1.0, 2)}}, "frame count 'lots' is not allowed"),
        ({"240p": {51: 1.0}}, r"\[51\]=1.0 is not allowed"),
        ("stage9", "is not a preset"),
    ],
)
def test_config_errors_name_field_and_value(config, match):
    with pytest.raises(ValueError, match=match):
        BucketConfig(config)


def test_assignment_rules():
    b = BucketConfig(SMALL)
    assert b.get_bucket_id(200, 240, 426) == ("240p", 102, "0.56")  # longest length that fits
    assert b.get_bucket_id(102, 240, 426) == ("240p", 51, "0.56")  # strictly more frames than 102
    assert b.get_bucket_id(52, 240, 426) == ("240p", 51, "0.56")
    assert b.get_bucket_id(51, 240, 426) is None  # fits no length anywhere: dropped
    assert b.get_bucket_id(120, 200, 200) == ("144p", 51, "1.00")  # 40000 px < 0.8 * 102240
    assert b.get_bucket_id(120, 150, 150) is None  # 22500 px < 0.8 * 36864: too small for any
    assert b.get_bucket_id(1, 240, 426) == ("144p", 1, "0.56")  # 240p has no image entry
    assert b.get_bucket_id(120, 426, 240) == ("240p", 102, "1.78")  # portrait key (H/W)
    assert b.get_bucket_id(300, 240, 426, frame_interval=3) == ("240p", 51, "0.56")  # 300 > 51*3, not > 102*3
    assert b.shape(("240p", 102, "0.56")) == (102, 240, 426)


def test_zero_probability_pushes_long_clips_to_a_smaller_resolution():
    b = BucketConfig({"480p": {204: (0.0, None), 51: (1.0, 1)}, "240p": {204: (1.0, 1)}})
    assert b.get_bucket_id(300, 480, 854, seed=11) == ("240p", 204, "0.56")
    assert b.get_bucket_id(100, 480, 854, seed=11) == ("480p", 51, "0.56")


def test_keep_probabilities_are_respected_over_seeds():
    b = BucketConfig({"240p": {51: (0.3, 1)}})
    kept = np.mean([b.get_bucket_id(60, 240, 426, seed=s) is not None for s in range(4000)])
    assert abs(kept - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    t = BucketConfig({"240p": {102: ((1.0, 0.25), 1), 51: (1.0, 1)}})
    long = np.mean([t.get_bucket_id(150, 240, 426, seed=s)[1] == 102 for s in range(4000)])
    assert abs(long - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    assert b.get_bucket_id(60, 240, 426, seed=5) == b.get_bucket_id(60, 240, 426, seed=5)


def test_each_batch_has_one_shape_and_the_right_size():
    b = BucketConfig(SMALL)
    sampler = BucketBatchSampler(mixed_sizes(), b, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 10
    for keys in batches:
        shapes = {parse_bucket_key(k)[1:] for k in keys}
        assert len(shapes) == 1
        T, H, W = shapes.pop()
        res = "240p" if H * W > 40000 else "144p"
        assert len(keys) == b.batch_sizes[(res, T)]
    ids = [parse_bucket_key(k)[0] for keys in batches for k in keys]
    assert len(ids) == len(set(ids))  # drop_last: no sample twice


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    b = BucketConfig(SMALL)
    a, c = BucketBatchSampler(mixed_sizes(), b, seed=1), BucketBatchSampler(mixed_sizes(), b, seed=1)
    assert list(a) == list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(mixed_sizes(), b, seed=2)) != first


def test_sampler_resumes_at_its_position():
    b = BucketConfig(SMALL)
    sampler = BucketBatchSampler(mixed_sizes(), b, seed=4, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    state = sampler.state_dict(batches_consumed=5)
    assert state == {"seed": 4, "epoch": 3, "position": 10, "num_replicas": 2}
    resumed = BucketBatchSampler(mixed_sizes(), b, seed=4, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer calls this each epoch; the same epoch keeps the position
    assert list(resumed) == full[5:] and len(resumed) == len(full) - 5
    resumed.set_epoch(4)
    assert len(list(resumed)) == len(resumed) > len(full) - 5
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(mixed_sizes(), b, seed=5).load_state_dict(state)


def test_ranks_get_disjoint_shares_of_the_same_epoch():
    b = BucketConfig(SMALL)
    ranks = [BucketBatchSampler(mixed_sizes(), b, seed=9, num_replicas=3, rank=r) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of steps
    dealt = [batch for step in zip(*shares) for batch in step]
    everything = ranks[0].epoch_batches()
    assert len(everything) % 3 == 0
    assert dealt == [[f"{i}-{'-'.join(map(str, b.shape(bk)))}" for i in ids] for bk, ids in everything]
    ids = [k for s in shares for batch in s for k in batch]
    assert len(ids) == len(set(ids))


def test_fixed_assignments_and_padding():
    b = BucketConfig(SMALL)
    fixed = [("144p", 51, "1.00")] * 7 + [None]
    sampler = BucketBatchSampler(None, b, assignments=fixed, drop_last=False, num_replicas=2)
    batches = sampler.epoch_batches()
    assert len(batches) == 4 and all(len(ids) == 3 for _, ids in batches)  # 7 -> 9 by repetition, 3 -> 4 batches
    assert sampler.assign(5) == fixed
    with pytest.raises(ValueError, match="not in the bucket config"):
        BucketBatchSampler(None, b, assignments=[("240p", 17, "1.00")])
    with pytest.raises(ValueError, match="exactly one"):
        BucketBatchSampler(None, b)


def test_extra_resolutions_for_small_clips():
    b = BucketConfig({"32px": {17: (1.0, 4)}}, extra_resolutions={"32px": 1024})
    assert b.get_bucket_id(20, 32, 32) == ("32px", 17, "1.00")
    assert b.shape(("32px", 17, "1.00")) == (17, 32, 32)
    with pytest.raises(ValueError, match="extra_resolutions"):
        BucketConfig({"32px": {17: (1.0, 4)}}, extra_resolutions={"32px": 0})


def test_bucket_keys_are_checked():
    assert parse_bucket_key("12-17-32-48") == (12, 17, 32, 48)
    for bad in ("12-17-32", "a-1-2-3", "1-0-2-2"):
        with pytest.raises(ValueError, match="idx-T-H-W|must be >= 1"):
            parse_bucket_key(bad)
