"""Prompt processing: clean_caption, score suffixes, camera motions, loop prompts, inline JSON."""

import pytest

from opensora_sdk.text import (
    CAMERA_MOTIONS,
    PromptSegment,
    append_score_suffixes,
    check_prompt,
    clean_caption,
    extract_inline_json,
    merge_loop_prompt,
    parse_loop_prompt,
    process_prompt,
    prompt_for_loop,
    text_preprocessing,
)

# ---- clean_caption: the spec's examples (6.4), exactly ---------------------------------------


def test_spec_example_stylish_woman():
    raw = (
        "A stylish woman … (and boots)! aesthetic score: 6.5. motion score: 5.0. "
        "camera motion: pan left."
    )
    assert text_preprocessing(raw) == (
        "a stylish woman … and boots ! aesthetic score: 6.5. motion score: 5.0. "
        "camera motion: pan left."
    )


def test_spec_example_bracketed_scores():
    raw = "a cat [aesthetic score: 5.5, motion score: 10.0]"
    assert text_preprocessing(raw) == "a cat aesthetic score: 5.5, motion score: 10.0"


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Visit https://example.com/page now", "visit now"),
        ("<b>Bold</b> text", "bold text"),
        ("hello @someone there", "hello there"),
        ("a 中文 cat", "a cat"),
        ("a\u2014b and c\u2013d", "a-b and c-d"),
        ("say \u201chi\u201d now", 'say "hi" now'),
        ("\u201cquoted\u201d", "quoted"),  # outer quotes are trimmed
        ("rock &amp; roll", "rock roll"),
        ("a*b#c~d|e/f\\g", "a b c d e f g"),
        ("photo.jpg of a dog", "of a dog"),
        ("many    spaces\there", "many spaces here"),
        ("a%20cat", "a cat"),
    ],
)
def test_clean_caption_rules(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_text_preprocessing_is_clean_caption_twice():
    raw = "'A ''quoted'' Cat (big)...'"
    assert text_preprocessing(raw) == clean_caption(clean_caption(raw))


# ---- score suffixes ---------------------------------------------------------------------------


def test_suffix_default_is_aesthetic_6_5():
    assert append_score_suffixes("a cat") == "a cat aesthetic score: 6.5."


def test_suffixes_order_and_format():
    out = append_score_suffixes("a cat", aes=7, flow=5, camera_motion="pan left")
    assert out == "a cat aesthetic score: 7.0. motion score: 5.0. camera motion: pan left."


def test_suffix_formatting_rounds_to_one_decimal():
    assert append_score_suffixes("x", aes=6.25, flow=12.345) == "x aesthetic score: 6.2. motion score: 12.3."


def test_suffixes_skipped_when_none():
    assert append_score_suffixes("a cat", aes=None) == "a cat"
    assert append_score_suffixes("a cat", aes=None, camera_motion="static") == "a cat camera motion: static."


def test_suffix_only_if_phrase_absent():
    prompt = "a cat aesthetic score: 5.0. camera motion: zoom in."
    out = append_score_suffixes(prompt, aes=6.5, flow=3, camera_motion="pan right")
    assert out == prompt + " motion score: 3.0."
    # the check is case-sensitive, as in the official code
    assert append_score_suffixes("A cat. Aesthetic score: 5.") == "A cat. Aesthetic score: 5. aesthetic score: 6.5."


def test_camera_motion_list_and_normalisation():
    assert CAMERA_MOTIONS == ("pan right", "pan left", "tilt up", "tilt down", "zoom in", "zoom out", "static")
    assert append_score_suffixes("x", aes=None, camera_motion=" Zoom Out ") == "x camera motion: zoom out."


@pytest.mark.parametrize("bad", ["dolly in", "pan", "", 3])
def test_camera_motion_error_lists_allowed(bad):
    with pytest.raises(ValueError) as err:
        append_score_suffixes("x", camera_motion=bad)
    message = str(err.value)
    assert "camera_motion" in message and repr(bad) in message
    assert all(m in message for m in CAMERA_MOTIONS)


@pytest.mark.parametrize(
    "field, value", [("aes", float("nan")), ("aes", "6.5"), ("flow", True), ("flow", float("inf"))]
)
def test_score_value_errors(field, value):
    with pytest.raises(ValueError, match=field):
        append_score_suffixes("x", **{field: value})


# ---- loop prompts -----------------------------------------------------------------------------


def test_plain_prompt_is_one_segment():
    assert parse_loop_prompt("  a cat | a dog ") == [PromptSegment(0, "a cat | a dog")]


def test_parse_and_select_loops():
    segments = parse_loop_prompt("|0|a cat|2| a dog |5|a bird")
    assert segments == [PromptSegment(0, "a cat"), PromptSegment(2, "a dog"), PromptSegment(5, "a bird")]
    assert [prompt_for_loop(segments, i) for i in range(7)] == [
        "a cat", "a cat", "a dog", "a dog", "a dog", "a bird", "a bird"
    ]


def test_merge_round_trip():
    text = "|0|a cat|2|a dog"
    assert merge_loop_prompt(parse_loop_prompt(text)) == text
    assert merge_loop_prompt([PromptSegment(0, "a cat")]) == "a cat"


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("|1|a cat", "must start at loop 0"),
        ("|0|a cat|x|a dog", "'x'"),
        ("|0|a cat|-1|a dog", "'-1'"),
        ("|0|a cat|2.5|a dog", "'2.5'"),
        ("|0|a cat|3|a dog|2|a bird", "strictly increase"),
        ("|0|a cat|0|a dog", "strictly increase"),
        ("|0|a cat|2|", "has no text"),
        ("|0|a cat|2", "has no text"),
        ("|0|   |2|a dog", "has no text"),
    ],
)
def test_loop_prompt_errors(prompt, words):
    with pytest.raises(ValueError, match="loop prompt") as err:
        parse_loop_prompt(prompt)
    assert words in str(err.value)


def test_prompt_for_loop_rejects_negative_index():
    with pytest.raises(ValueError, match="loop_index"):
        prompt_for_loop([PromptSegment(0, "a")], -1)


# ---- inline JSON ------------------------------------------------------------------------------


def test_inline_json_extracted():
    text, options = extract_inline_json('a cat {"reference_path": "a.png;b.png", "mask_strategy": "0;0,1,0,-1,1"}')
    assert text == "a cat"
    assert options == {"reference_path": "a.png;b.png", "mask_strategy": "0;0,1,0,-1,1"}
    assert extract_inline_json("a cat") == ("a cat", {})


@pytest.mark.parametrize(
    "prompt, words",
    [
        ('a cat {"seed": 3}', "'seed'"),
        ('a cat {"reference_path": ["a.png"]}', "must be a string"),
        ("a cat {not json}", "not valid JSON"),
    ],
)
def test_inline_json_errors(prompt, words):
    with pytest.raises(ValueError) as err:
        extract_inline_json(prompt)
    assert words in str(err.value)


# ---- the whole treatment ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   \n\t", None, '  {"mask_strategy": "0"}'])
def test_empty_prompt_is_an_error(bad):
    with pytest.raises(ValueError, match="prompt"):
        process_prompt(bad)


def test_check_prompt_passes_text_through():
    assert check_prompt("a cat") == "a cat"


def test_process_prompt_full_official_order():
    raw = '|0|A Cat (sitting)|2|A Dog {"reference_path": "cat.png", "mask_strategy": "0"}'
    p = process_prompt(raw, flow=5.0, camera_motion="pan left")
    suffix = " aesthetic score: 6.5. motion score: 5.0. camera motion: pan left."
    assert p.segments == (PromptSegment(0, "a cat sitting" + suffix), PromptSegment(2, "a dog" + suffix))
    assert p.text == f"|0|a cat sitting{suffix}|2|a dog{suffix}"
    assert (p.reference_path, p.mask_strategy) == ("cat.png", "0")
    assert p.for_loop(0) == "a cat sitting" + suffix and p.for_loop(3) == "a dog" + suffix


def test_process_prompt_plain_and_unclean():
    assert process_prompt("A Cat.").text == "a cat. aesthetic score: 6.5."
    assert process_prompt("A Cat.", clean=False).text == "A Cat. aesthetic score: 6.5."


def test_prompt_empty_after_cleaning_is_an_error():
    with pytest.raises(ValueError, match="empty after cleaning"):
        process_prompt("((( ***", aes=None)
