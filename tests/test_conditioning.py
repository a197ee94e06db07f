"""Conditioning: the mask-strategy language against the goldens, typed conditions, loops."""

from __future__ import annotations

import pytest
import torch

from opensora_sdk.conditioning import (
    ImageCondition,
    MaskGroup,
    VideoCondition,
    append_loop_reference,
    apply_mask_strategy,
    apply_mask_strategy_official,
    concat_loop_videos,
    condition_pixel_frames,
    condition_pixels,
    conditions_to_strategy,
    encode_conditions,
    find_nearest_point,
    format_mask_strategy,
    loop_condition_group,
    looped_num_frames,
    parse_mask_strategy,
)


def _case_refs(g, case):
    name = case["case"]
    return [[g[f"{name}.ref.{i}.{j}"] for j in range(len(lens))] for i, lens in enumerate(case["ref_lengths"])]


# ---- goldens ------------------------------------------------------------------------------


def test_parse_golden(golden):
    meta = golden("mask_strategy").meta
    for text, expected in meta["parse_mask_strategy"].items():
        groups = parse_mask_strategy(text)
        assert [list(gr) for gr in groups] == expected, text
        assert parse_mask_strategy(format_mask_strategy(groups)) == groups  # round trip


def test_find_nearest_point_golden(golden):
    for case in golden("mask_strategy").meta["find_nearest_point"]:
        assert find_nearest_point(case["value"], case["point"], case["max_value"]) == case["out"], case


def test_apply_golden_returns_new_z(golden):
    g = golden("mask_strategy")
    for case in g.meta["apply_cases"]:
        if case["returns_none"]:
            continue
        name = case["case"]
        before = g[f"{name}.z_before"].clone()
        args = (_case_refs(g, case), case["mask_strategys"], case["loop_i"], case["align"])
        z, mask = apply_mask_strategy(before, *args)
        assert torch.equal(before, g[f"{name}.z_before"]), "input must not be modified"
        assert torch.equal(z, g[f"{name}.z_after"]), name
        assert torch.equal(mask, g[f"{name}.masks"]) and mask.dtype == torch.float32, name
        assert mask.tolist() == case["masks"]  # the sidecar stores the float32 values


def test_apply_golden_official_convention_in_place(golden):
    g = golden("mask_strategy")
    for case in g.meta["apply_cases"]:
        name = case["case"]
        if case["returns_none"]:
            assert apply_mask_strategy_official(torch.zeros(1, 4, 15, 2, 3), [], case["mask_strategys"], 0) is None
            continue
        z = g[f"{name}.z_before"].clone()
        args = (_case_refs(g, case), case["mask_strategys"], case["loop_i"], case["align"])
        mask = apply_mask_strategy_official(z, *args)
        assert torch.equal(z, g[f"{name}.z_after"]) and torch.equal(mask, g[f"{name}.masks"]), name


def test_rflow_golden_masks_from_strategy(golden):
    g = golden("rflow_sample")
    refs = [[g["in.ref.0.0"]], [g["in.ref.1.0"], g["in.ref.1.1"]]]
    z, mask = apply_mask_strategy(g["in.z_init"], refs, g.meta["mask_strategy"], 0, None)
    assert torch.equal(z, g["in.z"]) and torch.equal(mask, g["in.masks"])


# ---- parsing errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("0,a", r"group 0 \('0,a'\): field ref_id must be an integer, got 'a'"),
        ("0;0,0,0,0,1,x", r"group 1 .*field edit_ratio must be a number, got 'x'"),
        ("0,0,0,0,1,0,7", r"has 7 fields; at most 6: loop,ref_id,ref_start,target_start,length,edit_ratio"),
        ("0;;1", r"group 1 \(''\) is empty"),
        ("0;", r"group 1 \(''\) is empty"),
        ("0,,1", r"field ref_id must be an integer, got ''"),
        ("0,0,0,0,0", r"field length must be >= 1"),
        ("0,0,0,0,1,1.5", r"field edit_ratio must be in \[0, 1\], got 1.5"),
        ("-1", r"field loop must be >= 0"),
        ("0,-2", r"field ref_id must be >= 0"),
    ],
)
def test_malformed_strings_name_group_and_field(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_mask_strategy(text)


def test_empty_and_defaults():
    assert parse_mask_strategy(None) == parse_mask_strategy("") == parse_mask_strategy("  ") == []
    assert parse_mask_strategy("2,1") == [MaskGroup(2, 1, 0, 0, 1, 0.0)]
    assert str(MaskGroup(0, 1, -5, 0, 5, 0.5)) == "0,1,-5,0,5,0.5"


# ---- apply: validation and semantics ----------------------------------------------------------


def _z_refs(T=10, t_refs=(3,)):
    z = torch.zeros(1, 4, T, 2, 2)
    refs = [[torch.full((4, n, 2, 2), float(k + 1)) for k, n in enumerate(t_refs)]]
    return z, refs


def test_out_of_range_indices_are_errors_naming_the_field():
    z, refs = _z_refs()
    group = r"sample 0, mask_strategy group 1 \('0,1,0,0,1,0.0'\)"
    with pytest.raises(ValueError, match=group + ": field ref_id=1 but sample 0 has 1 reference"):
        apply_mask_strategy(z, refs, ["0;0,1"])
    outside = r"field target_start=10 is outside the 10 latent frames of the output latent \(allowed -10..9\)"
    with pytest.raises(ValueError, match=outside):
        apply_mask_strategy(z, refs, ["0,0,0,10"])
    with pytest.raises(ValueError, match=r"field ref_start=-4 is outside the 3 latent frames of reference 0"):
        apply_mask_strategy(z, refs, ["0,0,-4"])
    with pytest.raises(ValueError, match="reference 0 has shape"):
        apply_mask_strategy(z, [[torch.zeros(4, 2, 3, 3)]], ["0"])
    with pytest.raises(ValueError, match="strategies has 2 entries; z has batch 1"):
        apply_mask_strategy(z, refs, ["0", "0"])
    # groups of other loops are not checked against this loop's references
    _, mask = apply_mask_strategy(z, refs, ["1,5"], loop_i=0)
    assert mask.tolist() == [[1.0] * 10]


def test_apply_clips_length_and_writes_edit_ratio():
    z, refs = _z_refs(T=10, t_refs=(3,))
    out, mask = apply_mask_strategy(z, refs, ["0,0,1,8,5,0.25"])  # 5 requested, 2 fit
    assert mask[0].tolist() == [1.0] * 8 + [0.25, 0.25]
    assert out[0, :, 8:].eq(1.0).all() and out[0, :, :8].eq(0.0).all()
    _, none = apply_mask_strategy(z, [None], [""])
    assert none.tolist() == [[1.0] * 10]


# ---- typed conditions ---------------------------------------------------------------------------


def fake_encode(pixels):
    """[1, 3, F, H, W] -> [1, 4, T', H/8, W/8] with T' = 5 * (F // 17) + ceil((F % 17) / 4)."""
    _, _, n, h, w = pixels.shape
    t = 5 * (n // 17) + -(-(n % 17) // 4)
    return pixels.mean(1, keepdim=True)[:, :, :t, ::8, ::8].expand(1, 4, t, h // 8, w // 8).clone()


def test_typed_conditions_to_strategy_string():
    img = torch.zeros(3, 64, 112)
    vid = torch.zeros(3, 34, 64, 112)
    conds = [
        ImageCondition(img),
        ImageCondition(img, frame=-1, edit_ratio=0.5),
        VideoCondition(vid, ref_start=-5, target_start=0, length=5),
        VideoCondition(vid, edit_ratio=0.4, loop=1),
    ]
    text = conditions_to_strategy(conds, ref_latent_frames=[1, 1, 10, 10])
    assert text == "0,0,0,0,1,0.0;0,1,0,-1,1,0.5;0,2,-5,0,5,0.0;1,3,0,0,10,0.4"
    with pytest.raises(ValueError, match=r"conditions\[0\]: length=None needs ref_latent_frames"):
        conditions_to_strategy([VideoCondition(vid)])
    with pytest.raises(ValueError, match="edit_ratio must be in"):
        conditions_to_strategy([ImageCondition(img, edit_ratio=2.0)])
    with pytest.raises(TypeError, match="expected ImageCondition or VideoCondition"):
        conditions_to_strategy(["a.png"])


def test_typed_and_string_forms_give_the_same_latent():
    H, W = 64, 112
    first = torch.rand(3, H, W) * 2 - 1
    last = torch.rand(3, H, W) * 2 - 1
    refs, text = encode_conditions(
        [ImageCondition(first), ImageCondition(last, frame=-1)], fake_encode, height=H, width=W
    )
    assert text == "0,0,0,0,1,0.0;0,1,0,-1,1,0.0"
    z = torch.randn(1, 4, 5, H // 8, W // 8)
    typed = apply_mask_strategy(z, [refs], [text])
    by_hand = apply_mask_strategy(
        z, [[fake_encode(first[:, None][None])[0], fake_encode(last[:, None][None])[0]]], ["0;0,1,0,-1,1"]
    )
    assert torch.equal(typed[0], by_hand[0]) and torch.equal(typed[1], by_hand[1])
    assert typed[1].tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_video_condition_extension_uses_last_latents():
    vid = torch.linspace(-1, 1, 34)[None, :, None, None].expand(3, 34, 16, 16).clone()
    refs, text = encode_conditions([VideoCondition(vid, ref_start=-5, length=5)], fake_encode, height=16, width=16)
    assert refs[0].shape == (4, 10, 2, 2) and text == "0,0,-5,0,5,0.0"
    z, mask = apply_mask_strategy(torch.zeros(1, 4, 10, 2, 2), [refs], [text])
    assert torch.equal(z[0, :, :5], refs[0][:, 5:]) and mask[0].tolist() == [0.0] * 5 + [1.0] * 5


def test_condition_pixels_resize_and_checks(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (200, 100), (255, 0, 0)).save(path)
    px = condition_pixels(ImageCondition(str(path)), 64, 64)
    assert px.shape == (3, 1, 64, 64)
    assert px[0].eq(1.0).all() and px[1].eq(-1.0).all()  # red in [-1, 1]
    px = condition_pixels(ImageCondition(torch.zeros(3, 32, 48)), 64, 64)
    assert px.shape == (3, 1, 64, 64)
    vid = condition_pixels(VideoCondition(torch.zeros(3, 5, 30, 40)), 16, 24)
    assert vid.shape == (3, 5, 16, 24)
    with pytest.raises(ValueError, match=r"pixels must be in \[-1, 1\].*x / 127.5 - 1"):
        condition_pixels(ImageCondition(torch.full((3, 8, 8), 255.0)), 8, 8)
    with pytest.raises(ValueError, match="pass read_video"):
        condition_pixels(VideoCondition("clip.mp4"), 8, 8)
    loaded = condition_pixels(VideoCondition("clip.mp4"), 8, 8, read_video=lambda p: torch.zeros(3, 2, 8, 8))
    assert loaded.shape == (3, 2, 8, 8)


# ---- long videos ------------------------------------------------------------------------------


def test_loop_group_and_append():
    assert loop_condition_group(1, 2, 5, 0.0) == "1,2,-5,0,5,0.0"
    refs, text = append_loop_reference([torch.zeros(1)], "0", torch.ones(1), loop_i=1)
    assert len(refs) == 2 and text == "0;1,1,-5,0,5,0.0"
    refs2, text2 = append_loop_reference(None, "", torch.ones(1), loop_i=1, condition_frame_length=10, edit_ratio=0.2)
    assert len(refs2) == 1 and text2 == "1,0,-10,0,10,0.2"
    assert parse_mask_strategy(text)[1] == MaskGroup(1, 1, -5, 0, 5, 0.0)


def test_condition_frame_length_must_be_multiple_of_5():
    assert condition_pixel_frames(5) == 17 and condition_pixel_frames(10) == 34
    for bad in (0, 3, 7, -5, 5.0):
        with pytest.raises(ValueError, match="condition_frame_length must be a positive multiple of 5"):
            condition_pixel_frames(bad)
    with pytest.raises(ValueError, match="multiple of 5"):
        loop_condition_group(1, 0, 4)


def test_looped_length_and_concatenation():
    assert looped_num_frames(51, 1) == 51
    assert looped_num_frames(51, 3, 5) == 3 * 51 - 2 * 17
    assert looped_num_frames(102, 2, 10) == 204 - 34
    with pytest.raises(ValueError, match="must be shorter than num_frames=17"):
        looped_num_frames(17, 2, 5)
    clips = [torch.full((3, 51, 4, 4), float(i)) for i in range(3)]
    video = concat_loop_videos(clips, 5)
    assert video.shape[1] == looped_num_frames(51, 3, 5)
    assert video[:, :51].eq(0).all() and video[:, 51:85].eq(1).all() and video[:, 85:].eq(2).all()
    batched = concat_loop_videos([c[None] for c in clips], 5)
    assert torch.equal(batched[0], video)
