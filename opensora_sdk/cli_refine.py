"""The `--llm-refine` options of `opensora generate` and `opensora app`, and how the commands use
them (the refinement itself is `opensora_sdk.refine`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def str2bool(text: str) -> bool:
    """The official scripts' str2bool: true/false, yes/no, 1/0, on/off."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def add_refine_args(p: argparse.ArgumentParser) -> None:
    from opensora_sdk.refine import DEFAULT_RETRIES, DEFAULT_TIMEOUT

    g = p.add_argument_group("prompt refinement (an OpenAI-compatible chat model rewrites each prompt first)")
    g.add_argument("--llm-refine", nargs="?", type=str2bool, const=True, default=False, metavar="BOOL",
                   help="rewrite each prompt into a detailed English video description before the score suffixes are "
                        "added (any language in; an empty prompt, --prompt '', gets a random one; with an image "
                        "reference the model is shown the image) (default off)")
    g.add_argument("--llm-refine-api-key", default=None, metavar="KEY",
                   help="API key (default $OPENAI_API_KEY, which keeps it out of the process list); never printed")
    g.add_argument("--llm-refine-base-url", default=None, metavar="URL",
                   help="the chat-completions server (default $OPENAI_BASE_URL, else https://api.openai.com/v1)")
    g.add_argument("--llm-refine-model", default=None, metavar="NAME",
                   help="model name (default $OPENSORA_REFINE_MODEL, else gpt-4o, the official choice)")
    g.add_argument("--llm-refine-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each request (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--llm-refine-retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                   help=f"extra tries after a timeout, a connection error, 429 or 5xx (default {DEFAULT_RETRIES})")
    g.add_argument("--llm-refine-fallback", action="store_true",
                   help="when refinement fails, keep the original prompt with a warning (default: stop with the error)")


def endpoint(args):
    """The chat endpoint from the flags and the environment; RefineError (one line, naming
    OPENAI_API_KEY) when no key is found for OpenAI."""
    from opensora_sdk.refine import RefineEndpoint

    return RefineEndpoint.from_env(args.llm_refine_api_key, args.llm_refine_base_url, args.llm_refine_model,
                                   timeout=args.llm_refine_timeout, retries=args.llm_refine_retries)


def reference_image(args, prompt: str, index: int) -> Path | None:
    """The first reference of prompt `index` (inline JSON, else --reference-path) when it is an
    image file: what image-to-video refinement shows the model."""
    from opensora_sdk.text import extract_inline_json
    from opensora_sdk.video_io import IMAGE_SUFFIXES

    refs = extract_inline_json(prompt)[1].get("reference_path")
    if refs is None and args.reference_path:
        refs = args.reference_path[index] if len(args.reference_path) > 1 else args.reference_path[0]
    first = Path(refs.split(";")[0].strip()) if refs else None
    return first if first is not None and first.suffix.lower() in IMAGE_SUFFIXES and first.is_file() else None


def refine_prompts(args, endpoint, prompts: list[str], which, say: bool, proc=None) -> list[str]:
    """prompts[i] for i in `which` rewritten by the chat model (shown prompt i's first reference
    image); each printed to stderr when `say`, warnings always. Under torchrun rank 0 asks and
    the other ranks receive its texts."""
    import warnings

    from opensora_sdk.refine import refine_prompt

    out = list(prompts)
    if proc is None or proc.is_main:
        for i in sorted(which):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out[i] = refine_prompt(prompts[i], image=reference_image(args, prompts[i], i), endpoint=endpoint,
                                       fallback=args.llm_refine_fallback)
            for w in caught:
                print(f"opensora {args.command}: warning: {w.message}", file=sys.stderr)
            if say:
                print(f"refined prompt {args.start_index + i}: {out[i]}", file=sys.stderr)
    if proc is not None:
        import torch.distributed as dist

        box = [out]
        dist.broadcast_object_list(box, src=0, group=proc.group)
        out = box[0]
    return out


__all__ = ["add_refine_args", "endpoint", "reference_image", "refine_prompts", "str2bool"]
