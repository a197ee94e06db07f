"""Prompt refinement (`--llm-refine`): a chat model rewrites a prompt before generation.

The official inference script (spec 3) sends each prompt to GPT-4o, which rewrites it into a
detailed English video description in the style of the training captions; an empty prompt
asks it for a random one. This module does the same against any OpenAI-compatible
chat-completions endpoint (OpenAI, Azure-style proxies, vLLM, llama.cpp, Ollama, ...), with the
standard library only (no `openai` package needed):

    from opensora_sdk.refine import RefineEndpoint, refine_prompt
    endpoint = RefineEndpoint.from_env()               # OPENAI_API_KEY, OPENAI_BASE_URL, OPENSORA_REFINE_MODEL
    text = refine_prompt("ein Hund am Strand", endpoint=endpoint)   # -> a detailed English description
    video = pipe(text)

Refinement runs first, before the score suffixes are appended and the text is cleaned (the
official order), so the suffixes and the cleaner see the refined text. Per prompt:

* inline JSON options (``... {"reference_path": ...}``) are kept as they are;
* loop segments (``|0|a cat|2|a dog``) are refined one by one; an empty segment (or an empty
  prompt) asks for a random prompt;
* with `image` (image-to-video) the model is shown the reference image (a base64 JPEG data URL
  in the user message, as the Open-Sora 1.3 script does) and asked to describe the video that
  starts from it, taking the prompt as a hint;
* the reply is tidied: one line, wrapping quotes removed, and the characters that mean
  something in a prompt (``|`` loop syntax, ``{`` ``}`` inline JSON) replaced by spaces.

Failures (no key, a timeout after the retries, an error status, a malformed reply) raise
`RefineError`, a ValueError with a one-line message; `fallback=True` keeps the original text
instead and issues a `RefineWarning`. The API key is sent in the Authorization header only: it
is never part of a message, a repr or a log line.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"  # the official script's model
ENV_API_KEY = "OPENAI_API_KEY"
ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_MODEL = "OPENSORA_REFINE_MODEL"
DEFAULT_TIMEOUT = 60.0  # seconds per request
DEFAULT_RETRIES = 2  # extra tries after a timeout, a connection error, 429 or 5xx
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_IMAGE_SIDE = 512  # the reference image is sent at most this large ("low" detail)

# Examples in the style of the captions the model was trained on (lower-case, concrete, every
# object named, camera and motion described).
EXAMPLES = (
    ("a close-up shot of a woman standing in a room with a white wall behind her. she has long brown hair and "
     "wears a blue sweater, and she slowly turns her head toward the camera and smiles."),
    ("a wide aerial shot of a winding river running through a dense green forest in the morning. thin mist "
     "rises from the water, and the camera glides forward above the treetops."),
    ("a red sports car drives along a coastal road at sunset. the ocean glitters on the right, palm trees pass "
     "by, and the camera follows the car from behind at a steady distance."),
    ("a small brown puppy plays with a yellow tennis ball on a wooden floor in a bright living room. it chases "
     "the ball, stumbles, and wags its tail while the camera stays still at floor level."),
    ("a time-lapse of a busy city intersection at night. cars leave streaks of red and white light, "
     "pedestrians cross under neon signs, and tall buildings glow in the background."),
    ("a chef in a white uniform chops fresh vegetables on a cutting board in a professional kitchen. steam "
     "rises from pots on the stove behind him, and the camera slowly zooms in on his hands."),
)

_RULES = (
    "The description should pay attention to all objects in the video, be useful for an AI to re-generate "
    "the video, be no more than six sentences, and be in English (translate the user's words if needed). "
    "Reply with the description only."
)
REFINE_SYSTEM = (
    "You must refine the user's prompt, which is used for video generation, to make it more suitable for the "
    "task. Here are examples of refined prompts:\n{examples}\n\n" + _RULES
)
RANDOM_SYSTEM = (
    "You will generate one input prompt for a video generation task. Here are examples of prompts:\n"
    "{examples}\n\n" + _RULES
)
RANDOM_USER = "Generate one example."
IMAGE_SYSTEM = (
    "Given the first frame of a video, describe this video and its style in great detail, so that it can be "
    "generated starting from this frame. Information about the video from the user: '{prompt}'. Describe "
    "what every person or animal is doing with actions (walking, talking, turning, blinking, laughing ...) and "
    "how things and the camera move, so that the video has movement rather than being static. " + _RULES
)
IMAGE_RANDOM_SYSTEM = (
    "Generate one input prompt suitable for generating a video using this image as the first frame. Describe "
    "the scene, its style and how people, animals, things and the camera move in it. " + _RULES
)
# Leading phrases of captioning models that describe the picture rather than the scene.
_CAPTION_PREFIXES = tuple(
    f"The {kind} {verb}" for kind in ("video", "image") for verb in ("shows", "captures", "features", "depicts",
                                                                     "presents", "is", "portrays")
) + ("In the video,", "In the image,")


class RefineError(ValueError):
    """Prompt refinement failed (no key, unreachable endpoint, error status, malformed reply)."""


class RefineWarning(UserWarning):
    """Refinement failed and the original prompt was kept (`fallback=True`)."""


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineEndpoint:
    """An OpenAI-compatible chat-completions endpoint: ``{base_url}/chat/completions``.

    api_key: sent as ``Authorization: Bearer``; None for local servers that need none (only
        allowed with a base_url other than OpenAI's). Never shown in repr or errors.
    timeout: seconds per request (connect and each read); retries: extra tries after a
        timeout, a connection error or a 408/409/429/5xx status, with 0.5, 1, 2 ... s pauses.
    """

    api_key: str | None = field(default=None, repr=False)
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __post_init__(self):
        if not isinstance(self.base_url, str) or not re.match(r"https?://", self.base_url):
            raise RefineError(f"refine base URL {self.base_url!r} must start with http:// or https://")
        if not self.api_key and self.base_url.rstrip("/") == DEFAULT_BASE_URL:
            raise RefineError(
                f"prompt refinement needs an API key: set {ENV_API_KEY} (or pass --llm-refine-api-key), or point "
                f"{ENV_BASE_URL} / --llm-refine-base-url at an OpenAI-compatible server that needs none"
            )
        if not self.model:
            raise RefineError(f"no refine model: set {ENV_MODEL} or pass --llm-refine-model")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise RefineError(f"refine timeout {self.timeout!r} must be a positive number of seconds")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise RefineError(f"refine retries {self.retries!r} must be an integer >= 0")

    @classmethod
    def from_env(
        cls,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        environ: Mapping[str, str] | None = None,
    ) -> RefineEndpoint:
        """The given values, else OPENAI_API_KEY, OPENAI_BASE_URL, OPENSORA_REFINE_MODEL, else the
        defaults (OpenAI's URL, gpt-4o). Raises RefineError when no key is found for OpenAI."""
        env = os.environ if environ is None else environ
        return cls(
            api_key=api_key or env.get(ENV_API_KEY) or None,
            base_url=(base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
            model=model or env.get(ENV_MODEL) or DEFAULT_MODEL,
            timeout=timeout,
            retries=retries,
        )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


def available(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `RefineEndpoint.from_env()` would find an endpoint (a key, or a non-OpenAI URL)."""
    try:
        RefineEndpoint.from_env(environ=environ)
    except RefineError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# One chat completion
# --------------------------------------------------------------------------------------------


def _error_detail(body: bytes) -> str:
    """The server's error message from an error response body, short."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def chat(endpoint: RefineEndpoint, messages: list[dict], **params: Any) -> str:
    """POST one chat completion and return ``choices[0].message.content``.

    `params` go into the request body (max_tokens, top_p, temperature ...; None values are
    left out). Raises RefineError with a one-line message naming the endpoint and the cause.
    """
    body = json.dumps({"model": endpoint.model, "messages": messages,
                       **{k: v for k, v in params.items() if v is not None}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    where = f"{endpoint.url} (model {endpoint.model})"
    failure = ""
    for attempt in range(endpoint.retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        request = urllib.request.Request(endpoint.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
                raw = response.read()
            break
        except urllib.error.HTTPError as err:
            failure = f"HTTP {err.code}: {_error_detail(err.read())}"
            if err.code not in _RETRY_STATUS:
                raise RefineError(endpoint._redact(f"prompt refinement failed: {where} answered {failure}")) from None
        except TimeoutError:
            failure = f"no answer within {endpoint.timeout:g} s"
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                failure = f"no answer within {endpoint.timeout:g} s"
            else:
                failure = f"cannot connect ({reason})"
        except (ConnectionError, OSError) as err:
            failure = f"connection failed ({err})"
    else:
        tries = endpoint.retries + 1
        raise RefineError(endpoint._redact(
            f"prompt refinement failed: {where}: {failure} ({tries} {'try' if tries == 1 else 'tries'}; "
            "raise --llm-refine-timeout / --llm-refine-retries, or use --llm-refine-fallback)"
        ))
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        snippet = " ".join(raw[:120].decode("utf-8", "replace").split())
        raise RefineError(endpoint._redact(
            f"prompt refinement failed: malformed reply from {where}: expected a chat completion with "
            f"choices[0].message.content, got {snippet!r}"
        )) from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RefineError(f"prompt refinement failed: malformed reply from {where}: message content is "
                          f"{type(content).__name__}, not text")
    return content


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def image_data_url(image, max_side: int = _IMAGE_SIDE) -> str:
    """A reference image as ``data:image/jpeg;base64,...`` (at most `max_side` pixels a side).

    image: a path (any image format `read_image` reads), a PIL image, or uint8 RGB numpy
    ``[H, W, 3]`` (or a float array / tensor in [0, 1])."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        from opensora_sdk.video_io import read_image

        image = Image.fromarray(read_image(image))
    elif not isinstance(image, Image.Image):
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(array.reshape(array.shape[-3:]) if array.ndim > 3 else array)
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _examples() -> str:
    return "\n".join(EXAMPLES)


def _messages(text: str, image_url: str | None) -> tuple[list[dict], dict]:
    """(messages, sampling params) for one segment's request."""
    if image_url is not None:
        system = IMAGE_SYSTEM.format(prompt=text) if text else IMAGE_RANDOM_SYSTEM
        user = [{"type": "image_url", "image_url": {"url": image_url, "detail": "low"}}]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], {"max_tokens": 300,
                                                                                           "top_p": 0.1}
    if not text:
        return [{"role": "system", "content": RANDOM_SYSTEM.format(examples=_examples())},
                {"role": "user", "content": RANDOM_USER}], {}
    return [{"role": "system", "content": REFINE_SYSTEM.format(examples=_examples())},
            {"role": "user", "content": text}], {}


def tidy(reply: str) -> str:
    """One line; wrapping quotes, a "Refined prompt:" label and a captioner's "The video shows"
    removed; ``|`` ``{`` ``}`` (prompt syntax) replaced by spaces."""
    text = " ".join(reply.split())
    text = re.sub(r"^(?:\*\*)?(?:refined|random)?\s*prompt\s*:\s*(?:\*\*)?\s*", "", text, flags=re.IGNORECASE)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    for prefix in _CAPTION_PREFIXES:
        if text.startswith((prefix, prefix.lower())):
            text = text[len(prefix):].strip()
            text = text[:1].upper() + text[1:]
            break
    return " ".join(re.sub(r"[|{}]", " ", text).split())


def _refine_text(text: str, image_url: str | None, endpoint: RefineEndpoint) -> str:
    messages, params = _messages(text.strip(), image_url)
    refined = tidy(chat(endpoint, messages, **params))
    if not refined:
        raise RefineError(f"prompt refinement failed: {endpoint.url} (model {endpoint.model}) returned an empty text")
    return refined


def _split(prompt: str) -> tuple[str, str, list[tuple[str, str]] | None]:
    """(text, inline JSON suffix, loop segments [(index, text)] or None for a plain prompt).
    Lenient: empty segments are allowed (they ask for a random prompt)."""
    cut = prompt.find("{")
    text, options = (prompt, "") if cut < 0 else (prompt[:cut], prompt[cut:])
    stripped = text.strip()
    if not stripped.startswith("|"):
        return text, options, None
    parts = stripped.split("|")[1:]
    if len(parts) % 2:
        parts.append("")
    pairs = [(parts[k].strip(), parts[k + 1]) for k in range(0, len(parts), 2)]
    if not all(i.isdigit() for i, _ in pairs):
        return text, options, None  # not loop syntax after all; `process_prompt` reports it
    return text, options, pairs


def refine_prompt(
    prompt: str,
    *,
    image=None,
    endpoint: RefineEndpoint | None = None,
    fallback: bool = False,
) -> str:
    """The prompt rewritten by the chat model: a detailed English description of the video.

    prompt: as given to the pipeline (loop segments and inline JSON kept; each segment is
        refined on its own; an empty prompt or segment asks for a random one).
    image: the reference image of an image-to-video generation (path, PIL image or array);
        the model sees it and describes the video that starts from it.
    endpoint: default `RefineEndpoint.from_env()`.
    fallback: on failure keep the original text (per segment) with a `RefineWarning`
        instead of raising `RefineError`. An empty text is never kept: it always raises.
    """
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    endpoint = RefineEndpoint.from_env() if endpoint is None else endpoint
    image_url = None if image is None else image_data_url(image)
    text, options, segments = _split(prompt)

    def one(segment: str, image_url: str | None) -> str:
        try:
            return _refine_text(segment, image_url, endpoint)
        except RefineError as err:
            if not fallback or not segment.strip():
                raise
            warnings.warn(f"{err}; keeping the original prompt {segment.strip()!r}", RefineWarning, stacklevel=3)
            return segment.strip()

    if segments is None:
        refined = one(text, image_url)
    else:  # the reference image is the first frame: it belongs to the first segment (loop 0)
        refined = "".join(f"|{index}|{one(seg, image_url if k == 0 else None)}" for k, (index, seg) in enumerate(segments))
    return f"{refined} {options}" if options else refined


def random_prompt(*, image=None, endpoint: RefineEndpoint | None = None) -> str:
    """A random video prompt from the chat model (for an image: one that starts from it)."""
    return refine_prompt("", image=image, endpoint=endpoint)


__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "RefineEndpoint",
    "RefineError",
    "RefineWarning",
    "available",
    "chat",
    "image_data_url",
    "random_prompt",
    "refine_prompt",
    "tidy",
]
