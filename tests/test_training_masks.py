"""Frame-mask augmentation: every type's effect, the official ratios, reproducibility."""

from __future__ import annotations

import pytest
import torch

from opensora_sdk.training.masks import MASK_RATIO_PRESETS, MASK_TYPES, MaskGenerator, resolve_mask_ratios

T = 12  # latent frames: q = 3


def draws(kind: str, num_frames: int = T, n: int = 300, seed: int = 0) -> list[torch.Tensor]:
    gen = MaskGenerator(None, seed=seed)
    return [gen.make_mask(kind, num_frames) for _ in range(n)]


def runs(mask: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(mask.tolist()) if not v]


def test_identity_conditions_nothing():
    assert all(bool(m.all()) for m in draws("identity", n=3))


def test_quarter_types():
    ks = set()
    for m in draws("quarter_head"):
        k = T - int(m.sum())
        ks.add(k)
        assert runs(m) == list(range(k))
    assert ks == {1, 2, 3}  # k ~ U{1..T//4}
    for m in draws("quarter_tail"):
        k = T - int(m.sum())
        assert 1 <= k <= 3 and runs(m) == list(range(T - k, T))
    for m in draws("quarter_head_tail"):
        off = runs(m)
        k = len(off) // 2
        assert 1 <= k <= 3 and off == list(range(k)) + list(range(T - k, T))
    starts = set()
    for m in draws("quarter_random"):
        off = runs(m)
        assert 1 <= len(off) <= 3 and off == list(range(off[0], off[0] + len(off)))
        starts.add(off[0])
    assert len(starts) > 5  # anywhere in the clip


def test_image_types():
    assert all(runs(m) == [0] for m in draws("image_head", n=3))
    assert all(runs(m) == [T - 1] for m in draws("image_tail", n=3))
    assert all(runs(m) == [0, T - 1] for m in draws("image_head_tail", n=3))
    positions = {runs(m)[0] for m in draws("image_random") if len(runs(m)) == 1}
    assert positions == set(range(T))


def test_interpolate_and_random():
    patterns = {tuple(runs(m)) for m in draws("intepolate")}
    assert patterns == {tuple(range(0, T, 2)), tuple(range(1, T, 2))}
    assert draws("interpolate", n=1)[0].sum() == T // 2  # the corrected spelling is accepted
    fractions = []
    for m in draws("random", n=500):
        assert bool(m.any())
        fractions.append(1 - float(m.float().mean()))
    mean = sum(fractions) / len(fractions)
    assert 0.4 < mean < 0.6 and min(fractions) < 0.2 and max(fractions) > 0.75  # r ~ U(0.1, 0.9)
    always_last = [m for m in draws("random", num_frames=1, n=50)]
    assert all(bool(m.all()) for m in always_last)


def test_short_clips():
    for kind in MASK_TYPES:
        assert bool(draws(kind, num_frames=1, n=5)[0].all())  # T' <= 1: all generated
    for kind in ("quarter_random", "quarter_head", "quarter_tail", "quarter_head_tail"):
        assert all(bool(m.all()) for m in draws(kind, num_frames=3, n=5))  # quarters need T' >= 4
    assert all(bool(m.all()) for m in draws("image_head_tail", num_frames=2, n=3))  # never 0 frames in the loss


def test_official_ratios_are_respected_over_many_draws():
    n = 20000
    for stage, identity in (("stage1", 0.80), ("stage3", 0.75)):
        gen = MaskGenerator(stage, seed=42)
        counts = {}
        for _ in range(n):
            kind = gen.choose()
            counts[kind] = counts.get(kind, 0) + 1
        expected = dict(MASK_RATIO_PRESETS[stage], identity=identity)
        for kind, p in expected.items():
            tolerance = 4 * (p * (1 - p) / n) ** 0.5 + 1e-9
            assert abs(counts.get(kind, 0) / n - p) <= tolerance, (stage, kind)


def test_get_masks_shape_and_reproducible_state():
    gen = MaskGenerator("stage1", seed=3)
    x = torch.zeros(6, 4, 5, 2, 2)
    masks = gen.get_masks(x)
    assert masks.shape == (6, 5) and masks.dtype == torch.bool
    state = gen.state_dict()
    after = [gen.get_masks(x) for _ in range(20)]
    other = MaskGenerator("stage1", seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, (other.get_masks(x) for _ in range(20))))


@pytest.mark.parametrize(
    "value, match",
    [
        ({"image_middle": 0.1}, "type 'image_middle' is unknown"),
        ({"random": 1.5}, r"mask_ratios\['random'\]=1.5"),
        ({"random": 0.7, "image_head": 0.5}, "sum to 1.2000"),
        ("stage7", "preset"),
        (3, "preset"),
    ],
)
def test_bad_ratios(value, match):
    with pytest.raises(ValueError, match=match):
        resolve_mask_ratios(value)


def test_chunk_head_gives_the_first_vae_chunk_when_there_is_more():
    """Ours: the first 5 latent frames (one 17-frame chunk of the v1.2 VAE), what loop i > 0
    conditions on; a clip of one chunk or less has nothing left to generate, so nothing is given."""
    assert all(runs(m) == [0, 1, 2, 3, 4] for m in draws("chunk_head", 10, n=3))
    assert all(runs(m) == [0, 1, 2, 3, 4] for m in draws("chunk_head", 15, n=3))
    assert all(bool(m.all()) for m in draws("chunk_head", 5, n=3))


def test_rows_may_name_their_mask_type():
    """get_masks(x, kinds): a named type is built for that row, "" / None draw by the ratios."""
    x = torch.zeros(4, 2, 10, 2, 2)
    gen = MaskGenerator({"image_head": 1.0}, seed=0)
    masks = gen.get_masks(x, ["chunk_head", "", None, "identity"])
    assert [runs(m) for m in masks] == [[0, 1, 2, 3, 4], [0], [0], []]
    assert [runs(m) for m in gen.get_masks(x)] == [[0]] * 4  # no kinds: every row drawn
    with pytest.raises(ValueError, match="mask type 'half' is unknown"):
        gen.get_masks(x, ["half", "", "", ""])
    with pytest.raises(ValueError, match="3 mask kinds for a batch of 4"):
        gen.get_masks(x, ["", "", ""])
