"""Prompt processing for Open-Sora v1.2: everything that happens to a prompt before T5.

The official inference script treats each prompt in this order (spec 6.4), and so does
`process_prompt`:

1. inline JSON: ``a cat {"reference_path": "cat.png", "mask_strategy": "0"}`` -> text + options;
2. loop syntax: ``|0|a cat|2|a dog`` -> segments (start loop, text);
3. score suffixes on every segment: `` aesthetic score: 6.5.`` `` motion score: 5.0.``
   `` camera motion: pan left.``, each only if its phrase is not already in the text;
4. `text_preprocessing` (= `clean_caption` twice) on every segment;
5. the segments merged back to ``|0|...|2|...``; loop i uses the last segment starting at or
   before i.

`clean_caption` is the caption cleaner of DeepFloyd IF, also used by PixArt and Open-Sora. The
HTML step uses the standard library's HTML parser instead of BeautifulSoup: both keep the text
nodes and decode entities.
"""

from __future__ import annotations

import html
import json
import math
import re
import urllib.parse as ul
from dataclasses import dataclass
from html.parser import HTMLParser

# The camera motions the official Gradio demo offers (and the captions were trained with).
CAMERA_MOTIONS = ("pan right", "pan left", "tilt up", "tilt down", "zoom in", "zoom out", "static")

# The phrases that mark a score already written into a prompt (checked case-sensitively,
# like the official `append_score_to_prompts`).
AESTHETIC_PHRASE = "aesthetic score:"
MOTION_PHRASE = "motion score:"
CAMERA_PHRASE = "camera motion:"

# Keys an inline JSON suffix may carry (spec 6.4, step 2).
INLINE_JSON_KEYS = ("reference_path", "mask_strategy")


# --------------------------------------------------------------------------------------------
# clean_caption (DeepFloyd IF / PixArt)
# --------------------------------------------------------------------------------------------

_BAD_PUNCT = re.compile(
    r"[" + "#®•©™&@·º½¾¿¡§~" + r"\)" + r"\(" + r"\]" + r"\[" + r"\}" + r"\{" + r"\|" + "\\" + r"\/"
    + r"\*" + r"]{1,}"
)
_URL_HTTP = re.compile(
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
    r"[\w/-]*\b\/?(?!@)))"
)
_URL_WWW = re.compile(
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
    r"[\w/-]*\b\/?(?!@)))"
)
# CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A and
# unified), Yijing hexagrams.
_CJK_RANGES = (
    r"[\u31c0-\u31ef]+",
    r"[\u31f0-\u31ff]+",
    r"[\u3200-\u32ff]+",
    r"[\u3300-\u33ff]+",
    r"[\u3400-\u4dbf]+",
    r"[\u4dc0-\u4dff]+",
    r"[\u4e00-\u9fff]+",
)
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030"
    r"\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")


class _TextOfHTML(HTMLParser):
    """Collects the text nodes of an HTML fragment (entities decoded), dropping the tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(caption: str) -> str:
    if "<" not in caption and "&" not in caption:
        return caption
    parser = _TextOfHTML()
    parser.feed(caption)
    parser.close()
    return "".join(parser.parts)


def clean_caption(caption: str) -> str:
    """One pass of the DeepFloyd IF caption cleaner.

    Lower-cases; url-unquotes; removes URLs, HTML tags, @handles, CJK characters, IP addresses,
    file names and shop boilerplate; normalises dashes and quotes; replaces
    ``#®•©™&@·º½¾¿¡§~()[]{}|\\/*`` with spaces; fixes mojibake with ftfy; collapses whitespace
    and trims quotes and punctuation at the ends.
    """
    caption = str(caption)
    caption = ul.unquote_plus(caption)
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    caption = _URL_HTTP.sub("", caption)
    caption = _URL_WWW.sub("", caption)
    caption = _html_text(caption)
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for cjk in _CJK_RANGES:
        caption = re.sub(cjk, "", caption)
    caption = _DASHES.sub("-", caption)  # every kind of dash -> "-"
    caption = re.sub(r"[`´«»“”¨]", '"', caption)  # quotes to one standard
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # IP addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)  # literal "\n"
    caption = re.sub(r"#\d{1,3}\b", "", caption)  # "#123"
    caption = re.sub(r"#\d{5,}\b", "", caption)  # "#12345.."
    caption = re.sub(r"\b\d{6,}\b", "", caption)  # "123456.."
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # files
    caption = re.sub(r"[\"\']{2,}", r'"', caption)  # """AUSVERKAUFT"""
    caption = re.sub(r"[\.]{2,}", r" ", caption)
    caption = _BAD_PUNCT.sub(r" ", caption)  # ***AUSVERKAUFT***, #AUSVERKAUFT
    caption = re.sub(r"\s+\.\s+", r" ", caption)  # " . "
    if len(_DASH_OR_UNDERSCORE.findall(caption)) > 3:  # this-is-my-cute-cat
        caption = _DASH_OR_UNDERSCORE.sub(" ", caption)
    import ftfy  # here, not at the top: `opensora --help` reads this module's constants only

    caption = ftfy.fix_text(caption)
    caption = html.unescape(html.unescape(caption))
    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)  # 1920x1080
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
    caption = re.sub(r"\s+", " ", caption)
    caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def text_preprocessing(text: str) -> str:
    """The official `text_preprocessing`: `clean_caption` applied twice."""
    return clean_caption(clean_caption(text))


# --------------------------------------------------------------------------------------------
# Score suffixes
# --------------------------------------------------------------------------------------------


def _check_score(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not allowed: expected a finite number (e.g. 6.5) or None")
    return float(value)


def check_camera_motion(camera_motion: str) -> str:
    """Return the canonical camera motion (stripped, lower-case) or raise ValueError."""
    motion = camera_motion.strip().lower() if isinstance(camera_motion, str) else camera_motion
    if motion not in CAMERA_MOTIONS:
        raise ValueError(
            f"camera_motion={camera_motion!r} is not allowed: choose one of {list(CAMERA_MOTIONS)} or None"
        )
    return motion


def append_score_suffixes(
    prompt: str, aes: float | None = 6.5, flow: float | None = None, camera_motion: str | None = None
) -> str:
    """Append the conditioning phrases the v1.2 model was trained with, in the official order.

    `` aesthetic score: {aes:.1f}.``, `` motion score: {flow:.1f}.``,
    `` camera motion: {camera_motion}.``; each is skipped when its value is None or when the
    prompt already contains that phrase (e.g. "aesthetic score:"), case-sensitively.
    """
    if aes is not None:
        aes = _check_score("aes", aes)
    if flow is not None:
        flow = _check_score("flow", flow)
    if camera_motion is not None:
        camera_motion = check_camera_motion(camera_motion)
    out = prompt
    if aes is not None and AESTHETIC_PHRASE not in prompt:
        out = f"{out} aesthetic score: {aes:.1f}."
    if flow is not None and MOTION_PHRASE not in prompt:
        out = f"{out} motion score: {flow:.1f}."
    if camera_motion is not None and CAMERA_PHRASE not in prompt:
        out = f"{out} camera motion: {camera_motion}."
    return out


# --------------------------------------------------------------------------------------------
# Inline JSON options
# --------------------------------------------------------------------------------------------


def extract_inline_json(prompt: str) -> tuple[str, dict[str, str]]:
    """Split ``text {"reference_path": ..., "mask_strategy": ...}`` at the first ``{``.

    Returns (text, options). The text keeps everything before the ``{`` (right-stripped); the
    options may only hold `reference_path` (paths separated by ``;``) and `mask_strategy`,
    both strings. A prompt without ``{`` gives an empty dict.
    """
    if "{" not in prompt:
        return prompt, {}
    cut = prompt.index("{")
    text, raw = prompt[:cut].rstrip(), prompt[cut:]
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"inline JSON {raw!r} in prompt is not valid JSON ({err.msg} at column {err.colno}); "
            f'expected e.g. {{"reference_path": "a.png", "mask_strategy": "0"}}'
        ) from None
    if not isinstance(options, dict):
        raise ValueError(f"inline JSON {raw!r} must be an object with keys {list(INLINE_JSON_KEYS)}")
    for key, value in options.items():
        if key not in INLINE_JSON_KEYS:
            raise ValueError(
                f"inline JSON key {key!r} is not allowed: allowed keys are {list(INLINE_JSON_KEYS)}"
            )
        if not isinstance(value, str):
            raise ValueError(
                f"inline JSON {key}={value!r} must be a string (several reference paths are "
                "joined with ';')"
            )
    return text, options


# --------------------------------------------------------------------------------------------
# Loop prompts: "|0|a cat|2|a dog"
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSegment:
    """The text used from loop `start_loop` on (until the next segment starts)."""

    start_loop: int
    text: str


_LOOP_FORMAT = "'|0|first text|2|text from loop 2 on'"


def parse_loop_prompt(prompt: str) -> list[PromptSegment]:
    """Parse a multi-segment loop prompt into segments with strictly increasing start loops.

    A prompt whose first non-blank character is ``|`` uses the loop syntax; any other prompt is
    one segment starting at loop 0 (a ``|`` later in a plain prompt is ordinary text, which
    cleaning turns into a space, as in the official code). Rules of the syntax: it starts with
    ``|0|``; every index is a non-negative integer written in digits; indices strictly
    increase; every segment has non-blank text. Each violation raises ValueError.
    """
    text = prompt.strip()
    if not text.startswith("|"):
        return [PromptSegment(0, text)]
    parts = text.split("|")[1:]  # "|0|a|2|b" -> ["0", "a", "2", "b"]
    if len(parts) % 2:
        parts.append("")  # an index with no text after it: reported below
    segments: list[PromptSegment] = []
    for k in range(0, len(parts), 2):
        raw_index, seg_text = parts[k], parts[k + 1].strip()
        if not re.fullmatch(r"\s*\d+\s*", raw_index):
            raise ValueError(
                f"loop prompt {prompt!r}: start loop {raw_index!r} of segment {k // 2} is not a "
                f"non-negative integer; expected {_LOOP_FORMAT}"
            )
        index = int(raw_index)
        if not segments and index != 0:
            raise ValueError(
                f"loop prompt {prompt!r}: the first segment starts at loop {index}, but it must "
                f"start at loop 0; expected {_LOOP_FORMAT}"
            )
        if segments and index <= segments[-1].start_loop:
            raise ValueError(
                f"loop prompt {prompt!r}: start loop {index} of segment {k // 2} does not come after "
                f"{segments[-1].start_loop}; start loops must strictly increase"
            )
        if not seg_text:
            raise ValueError(
                f"loop prompt {prompt!r}: segment {k // 2} (from loop {index}) has no text; "
                f"expected {_LOOP_FORMAT}"
            )
        segments.append(PromptSegment(index, seg_text))
    return segments


def prompt_for_loop(segments: list[PromptSegment] | tuple[PromptSegment, ...], loop_index: int) -> str:
    """The text for loop `loop_index`: the last segment whose start loop is <= loop_index."""
    if isinstance(loop_index, bool) or not isinstance(loop_index, int) or loop_index < 0:
        raise ValueError(f"loop_index={loop_index!r} is not allowed: expected an integer >= 0")
    if not segments or segments[0].start_loop != 0:
        raise ValueError(f"segments={segments!r} must be non-empty and start at loop 0")
    chosen = segments[0]
    for segment in segments:
        if segment.start_loop <= loop_index:
            chosen = segment
    return chosen.text


def merge_loop_prompt(segments: list[PromptSegment] | tuple[PromptSegment, ...]) -> str:
    """Inverse of `parse_loop_prompt`: ``|0|a|2|b``; a single segment gives its plain text."""
    if not segments:
        raise ValueError("segments=[] is not allowed: expected at least one segment")
    if len(segments) == 1 and segments[0].start_loop == 0:
        return segments[0].text
    return "".join(f"|{s.start_loop}|{s.text}" for s in segments)


# --------------------------------------------------------------------------------------------
# The whole treatment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt ready for the text encoder.

    `text` is the merged form (``|0|...|2|...`` for loop prompts); `segments` hold the
    processed text per segment; `reference_path` / `mask_strategy` come from an inline JSON
    suffix (None when absent) and override the per-prompt CLI or config values.
    """

    text: str
    segments: tuple[PromptSegment, ...]
    reference_path: str | None = None
    mask_strategy: str | None = None

    def for_loop(self, loop_index: int) -> str:
        return prompt_for_loop(self.segments, loop_index)


def check_prompt(prompt) -> str:
    """Raise ValueError for a prompt that is not a string or is empty / whitespace-only."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt={prompt!r} is not allowed: expected a non-empty string")
    if not prompt.strip():
        raise ValueError(f"prompt={prompt!r} is empty: give a text describing the video")
    return prompt


def process_prompt(
    prompt: str,
    *,
    aes: float | None = 6.5,
    flow: float | None = None,
    camera_motion: str | None = None,
    clean: bool = True,
) -> ProcessedPrompt:
    """Inline JSON, loop segments, score suffixes, cleaning and re-merge, as the official script.

    With `clean=False` the suffixes are still appended but the text is not cleaned (training
    captions are not cleaned, spec 6.4).
    """
    check_prompt(prompt)
    text, options = extract_inline_json(prompt)
    if not text.strip():
        raise ValueError(f"prompt={prompt!r} has no text before its inline JSON options")
    segments = []
    for segment in parse_loop_prompt(text):
        seg_text = append_score_suffixes(segment.text, aes=aes, flow=flow, camera_motion=camera_motion)
        if clean:
            seg_text = text_preprocessing(seg_text)
        if not seg_text.strip():
            raise ValueError(
                f"prompt segment {segment.text!r} is empty after cleaning; use words, not only "
                "symbols, or pass aes/flow/camera_motion"
            )
        segments.append(PromptSegment(segment.start_loop, seg_text))
    return ProcessedPrompt(
        text=merge_loop_prompt(segments),
        segments=tuple(segments),
        reference_path=options.get("reference_path"),
        mask_strategy=options.get("mask_strategy"),
    )
