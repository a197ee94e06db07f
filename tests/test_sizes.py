"""Sizes: the official tables and lookups (exhaustively against aspect.json), plus product rules."""

from __future__ import annotations

import warnings

import pytest

from opensora_sdk import sizes
from opensora_sdk.sizes import (
    ASPECT_RATIO_MAP,
    ASPECT_RATIOS,
    IMG_FPS,
    NUM_FRAMES_MAP,
    AspectRatioNotFound,
    aspect_ratio_names,
    get_ar,
    get_aspect_ratios_dict,
    get_closest_ratio,
    get_h_w,
    get_image_size,
    get_image_size_official,
    get_num_pixels,
    model_fps,
    parse_num_frames,
    resolve_image_size,
)


@pytest.fixture(scope="module")
def aspect(reference):
    import json

    return json.loads((reference / "golden" / "aspect.json").read_text())


# ---- goldens ------------------------------------------------------------------------------


def test_tables_equal_golden(aspect):
    assert ASPECT_RATIO_MAP == aspect["ASPECT_RATIO_MAP"]
    assert list(ASPECT_RATIOS) == list(aspect["ASPECT_RATIOS"])
    for res, entry in aspect["ASPECT_RATIOS"].items():
        ours = ASPECT_RATIOS[res]
        assert ours["num_pixels"] == entry["num_pixels"], res
        assert list(ours["table"]) == list(entry["table"]), res  # key order matters for ties
        assert {k: list(v) for k, v in ours["table"].items()} == entry["table"], res
    assert {r: get_num_pixels(r) for r in ASPECT_RATIOS} == aspect["get_num_pixels"]
    assert NUM_FRAMES_MAP == aspect["NUM_FRAMES_MAP"]
    assert IMG_FPS == aspect["IMG_FPS"]


def test_get_image_size_official_every_pair(aspect):
    for res, by_ratio in aspect["get_image_size"].items():
        for ratio, expected in by_ratio.items():
            if isinstance(expected, str):
                kind, message = expected.split(": ", 1)
                assert kind == "AssertionError"
                with pytest.raises(AssertionError, match=message):
                    get_image_size_official(res, ratio)
            else:
                assert list(get_image_size_official(res, ratio)) == expected, (res, ratio)


def test_get_image_size_product_agrees_where_official_resolves(aspect):
    for res, by_ratio in aspect["get_image_size"].items():
        for ratio, expected in by_ratio.items():
            if isinstance(expected, list):
                assert list(get_image_size(res, ratio)) == expected, (res, ratio)


def test_closest_ratio_golden(aspect):
    for case in aspect["get_closest_ratio"]:
        assert get_closest_ratio(case["height"], case["width"], case["resolution"]) == case["out"], case
        table = ASPECT_RATIOS[case["resolution"]]["table"]
        assert get_closest_ratio(case["height"], case["width"], table) == case["out"]


def test_num_frames_golden(aspect):
    for text, frames in aspect["get_num_frames"].items():
        assert parse_num_frames(text) == frames


def test_ar_h_w_and_generated_table_golden(aspect):
    for name, value in aspect["get_ar"].items():
        assert get_ar(name) == value
    for case in aspect["get_h_w"]:
        assert list(get_h_w(case["a"], case["ts"])) == case["out"], case
    generated = get_aspect_ratios_dict(get_num_pixels("240p"))
    assert {k: list(v) for k, v in generated.items()} == aspect["get_aspect_ratios_dict_240p"]


# ---- product behaviour ------------------------------------------------------------------------


def test_ratio_strings_are_h_over_w():
    assert get_image_size("720p", "9:16") == (720, 1280)  # landscape
    assert get_image_size("720p", "16:9") == (1280, 720)  # portrait
    assert get_image_size("240p", "0.56") == (240, 426)  # a table key works too


def test_pixart_tables_match_keys_by_value():
    assert get_image_size("256", "1:2") == (176, 352)  # "0.50" finds key "0.5"
    assert get_image_size("512", "1:1") == (512, 512)
    assert get_image_size("2880", "1:1") == (2880, 2880)
    assert aspect_ratio_names("256") == ["12:25", "1:2", "1:1", "2:1"]
    with pytest.raises(AssertionError, match="Aspect ratio 1:2 not found for resolution 256"):
        get_image_size_official("256", "1:2")
    assert issubclass(AspectRatioNotFound, ValueError)


def test_lookup_errors_list_valid_values():
    with pytest.raises(ValueError, match=r"resolution '300p' is not one of \['144p'"):
        get_image_size("300p", "9:16")
    with pytest.raises(ValueError, match=r"aspect_ratio '9:16' has no entry at resolution '256'.*'1:2'"):
        get_image_size("256", "9:16")
    with pytest.raises(ValueError, match=r"aspect_ratio '7:5'.*valid names.*'9:16'"):
        get_image_size("240p", "7:5")
    with pytest.raises(ValueError, match="must be 'H:W'"):
        get_ar("wide")
    with pytest.raises(ValueError, match="height and width must be positive"):
        get_closest_ratio(0, 10, "240p")


def test_parse_num_frames_forms_and_errors():
    assert parse_num_frames(51) == 51
    assert parse_num_frames(" 4s ") == 102
    assert parse_num_frames("2x") == 102
    assert parse_num_frames("1") == 1
    for bad in ("3y", "", "-5", 0, 1.5, True, "5.0"):
        with pytest.raises(ValueError, match="num_frames .* must be a positive integer or one of"):
            parse_num_frames(bad)


def test_model_fps_for_images():
    assert model_fps(1, 24) == 120
    assert model_fps(51, 24) == 24
    assert model_fps(102, 30) == 30


def test_resolve_image_size_rounding_is_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = resolve_image_size(height=240, width=432)
        table = resolve_image_size("240p", "9:16")
    assert (exact.height, exact.width, exact.note) == (240, 432, None)
    assert (table.height, table.width, table.note) == (240, 426, None)  # table values kept
    with pytest.warns(UserWarning, match="size 250x430 rounded to 248x432"):
        rounded = resolve_image_size(height=250, width=430)
    assert (rounded.height, rounded.width) == (248, 432) and "multiples of 8" in rounded.note
    with pytest.warns(UserWarning):
        assert resolve_image_size(height=3, width=12).height == 8  # never below one latent row
    explicit_wins = resolve_image_size("720p", "9:16", height=64, width=112)
    assert (explicit_wins.height, explicit_wins.width) == (64, 112)
    with pytest.raises(ValueError, match="resolution '999p' is not one of"):  # wins, but must still be a name
        resolve_image_size("999p", "9:16", height=64, width=112)


def test_resolve_image_size_errors():
    with pytest.raises(ValueError, match="give both height and width"):
        resolve_image_size(height=240)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        resolve_image_size(height=-8, width=16)
    with pytest.raises(ValueError, match="resolution and an aspect_ratio"):
        resolve_image_size(None, None)


def test_module_exports_exist():
    for name in sizes.__all__:
        assert hasattr(sizes, name), name
