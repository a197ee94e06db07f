"""Build the tiny T5-style tokenizer shipped in `opensora_sdk/builtin/tokenizer/`.

The tiny text encoder (tests, CPU experiments, the tiny Open-Sora) needs a tokenizer that
behaves like T5's for everything the pipeline relies on: ids 0 = ``<pad>``, 1 = ``</s>``,
2 = ``<unk>``; ``</s>`` appended to every text; right padding with id 0; truncation that keeps
the first ``max_length - 1`` tokens and the EOS. Like T5 it is a Unigram model over
"▁"-prefixed pieces with a Metaspace pre-tokenizer; unlike T5 its vocabulary is ~700 pieces
(lower-case English words for captions of simple scenes, single characters, digits and
punctuation as fall-backs) and it lower-cases its input.

Regenerate the shipped files (the output is deterministic)::

    python training/build_tiny_tokenizer.py            # writes opensora_sdk/builtin/tokenizer/
    python training/build_tiny_tokenizer.py OUT_DIR    # or anywhere else
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MODEL_MAX_LENGTH = 300
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "opensora_sdk" / "builtin" / "tokenizer"

WORDS = """
a an the this that these those some any each every all both no not and or but so if then than
as of in on at to from into onto over under above below behind beside between across through
along around near far off up down out with without by for about after before during while
toward towards against within upon away back together apart
is are was were be been being has have had do does did can could will would may might should
it its they them their he him his she her we us our you your i me my one ones who which what
where when how why there here very more most less least much many few several other another
same such only just also too still again once twice almost quite rather
red orange yellow green blue purple violet pink brown black white gray grey golden silver
cyan magenta teal navy beige dark light bright pale deep vivid colorful colourful transparent
circle circles square squares triangle triangles rectangle rectangles star stars dot dots line
lines ball balls box boxes cube cubes sphere spheres ring rings disk shape shapes object objects
block blocks stripe stripes pattern grid point points heart oval diamond hexagon polygon
small big large tiny huge little medium tall short long wide narrow thin thick round flat
sharp soft smooth rough slow slowly fast quickly quick steady steadily gentle gently smoothly
moving move moves moved motion still static stationary spinning spin spins rotating rotate
rotates rotation bouncing bounce bounces falling fall falls rising rise rises flying fly
flies floating float floats sliding slide slides rolling roll rolls drifting drift drifts
growing grow grows shrinking shrink shrinks fading fade fades flashing blinking pulsing
shaking swinging waving walking walk walks running run runs jumping jump jumps swimming
dancing sitting standing lying looking turning turn turns crossing passing following chasing
appearing disappearing changing entering leaving approaching zooming panning tilting
left right upward upwards downward downwards forward forwards backward backwards sideways
horizontal horizontally vertical vertically diagonal diagonally clockwise counterclockwise
top bottom middle center centre side sides corner corners edge edges front frame frames
background foreground scene view shot image video clip camera lens focus close closeup
wide angle aerial overhead pan tilt zoom tracking dolly handheld timelapse slow-motion
aesthetic score motion quality style cinematic realistic photorealistic animated animation
cartoon abstract minimal simple detailed high low resolution sharpness blur blurry noise
sky cloud clouds sun sunny sunset sunrise moon night day morning evening light lights shadow
shadows rain rainy snow snowy fog foggy wind windy storm water sea ocean wave waves beach
sand river lake pond waterfall mountain mountains hill hills valley forest tree trees leaf
leaves flower flowers grass field garden park rock rocks stone desert ice fire smoke space
city street road streets building buildings house houses room window door wall floor table
chair bed car cars bus train bicycle boat ship plane airplane bridge tower town village market
neon sign signs lamp glass mirror screen
cat cats dog dogs bird birds fish horse cow sheep rabbit fox bear lion tiger elephant monkey
butterfly bee insect animal animals
man men woman women person people child children boy girl baby face hand hands eye eyes hair
dress shirt jacket coat hat shoes boots
warm cold cool hot wet dry calm quiet loud busy empty full old new young beautiful pretty
stylish elegant happy sad dramatic peaceful serene mysterious magical dreamy vibrant glowing
shiny metallic wooden plastic paper
first second third last next final another
zero one two three four five six seven eight nine ten hundred
""".split()

PUNCTUATION = list(".,:;!?'\"-()[]{}/&+=%*#@_<>|~$^`\\")
SUFFIXES = ["s", "es", "ed", "ing", "ly", "er", "est", "y", "ness", "ful"]


def _pieces() -> list[tuple[str, float]]:
    """The Unigram vocabulary: special tokens, then words, then fall-back pieces."""
    vocab: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    seen = {PAD, EOS, UNK}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in WORDS:
        add("▁" + word, -6.0)
    add("▁", -9.0)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        add(ch, -10.0)
    for ch in PUNCTUATION:
        add(ch, -8.0)
    for suffix in SUFFIXES:
        add(suffix, -8.5)
    return vocab


def build_tiny_tokenizer() -> Tokenizer:
    """The `tokenizers.Tokenizer` with T5's special ids, EOS post-processor and padding."""
    tok = Tokenizer(models.Unigram(_pieces(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, EOS, UNK)])
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": MODEL_MAX_LENGTH,
    "pad_token": PAD,
    "eos_token": EOS,
    "unk_token": UNK,
    "padding_side": "right",
    "truncation_side": "right",
    "clean_up_tokenization_spaces": False,
}
SPECIAL_TOKENS_MAP = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}


def write_tiny_tokenizer(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`."""
    from opensora_sdk.loading import write_file_atomic, write_text_atomic

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    write_file_atomic(out / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp), pretty=False))
    for name, data in (("tokenizer_config.json", TOKENIZER_CONFIG), ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", out / name)
    return out


if __name__ == "__main__":
    print(write_tiny_tokenizer(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT))
