"""`opensora data caption`: captions from an OpenAI-compatible vision endpoint (spec 1.12).

    export OPENAI_API_KEY=...            # never printed, never written
    opensora data caption meta/clips.csv --model gpt-4o --rpm 60
    opensora data caption meta/clips.csv --base-url http://localhost:8000/v1 --model llava-v1.6 --api-key-env MY_KEY

Frames of each clip (JPEG, base64) go with the prompt as one user message to
`{base-url}/chat/completions` (`max_tokens` 300, 60 s timeout, as the official GPT-4V script);
the answer's newlines become spaces and it replaces `text`. The default prompt is the official
GPT-4V default `video-f3-detail-3ex` (three frames at 0.1, 0.5, 0.9 of the clip, in order, with
three example captions); `video` (the data-processing docs' prompt), `video-f1-detail-3ex`
(the middle frame), `image` and their `-text` variants (with the row's existing `text` as
extra information) are there too. The wording follows the official prompts; it is not a copy.

Errors: 429, 5xx, timeouts and connection errors are retried `--retries` times with
exponential back-off (honouring Retry-After); a 401 / 403 / 404 stops the run (bad key, model
or URL: every row would fail the same way); other answers fail the row. Finished rows are
journaled, so a re-run continues (failed rows are tried again). `--rpm` limits requests per
minute, `--concurrency` sends several at once. Base URL, model and key come from the flags or
OPENAI_BASE_URL, OPENSORA_CAPTION_MODEL and OPENAI_API_KEY (or the variable `--api-key-env`
names).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from opensora_sdk.data import table
from opensora_sdk.data.runner import report_errors, split_done

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
MAX_TOKENS = 300
TIMEOUT_S = 60.0
FATAL_STATUS = (401, 403, 404)

_ROLE = "Pay attention to all objects in the {kind}. The description should be useful for an AI to re-generate the {kind}."
_EXAMPLES = (
    " Here are some examples of good descriptions:"
    " 1. A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage. She wears"
    " a black leather jacket, a long red dress and black boots, and carries a black purse. The street is damp and"
    " reflective, creating a mirror effect of the colorful lights. Many pedestrians walk about."
    " 2. Several giant wooly mammoths approach, treading through a snowy meadow, their long wooly fur lightly blowing"
    " in the wind as they walk. Snow-covered trees and dramatic snow-capped mountains lie in the distance, and the"
    " warm mid-afternoon light with wispy clouds creates a beautiful scene."
    " 3. Drone view of waves crashing against the rugged cliffs along Big Sur's Garay Point beach. The crashing blue"
    " waters create white-tipped waves, while the golden light of the setting sun illuminates the rocky shore. A small"
    " island with a lighthouse sits in the distance, and green shrubbery covers the cliff's edge."
)
_INFO = " Some information about the {kind}: '{{}}'."
# name: (kind, frame points, text)
PROMPTS = {
    "image": ("image", (0.5,), "Describe this image and its style succinctly but informatively. " + _ROLE.format(kind="image")
              + " The description should be no more than five sentences. Remember: do not exceed five sentences."),
    "image-text": ("image", (0.5,), "Describe this image and its style in a very detailed manner. " + _ROLE.format(kind="image")
                   + " The description should be no more than six sentences." + _INFO.format(kind="image")),
    "video": ("video", (0.1, 0.5, 0.9), "Describe this video and its style in a very detailed manner. " + _ROLE.format(kind="video")
              + " The description should be no more than six sentences."),
    "video-text": ("video", (0.1, 0.5, 0.9), "Describe this video and its style in a very detailed manner. "
                   + _ROLE.format(kind="video") + " The description should be no more than six sentences." + _INFO.format(kind="video")),
    "video-f1-detail-3ex": ("video", (0.5,), "A video is given by providing its middle frame. Describe this video and its style. "
                            + _ROLE.format(kind="video") + " The description should be no more than six sentences." + _EXAMPLES),
    "video-f3-detail-3ex": ("video", (0.1, 0.5, 0.9), "A video is given by providing three frames in chronological order. "
                            "Describe this video and its style. " + _ROLE.format(kind="video") + " Do not describe each frame"
                            " individually. Do not reply with words like 'first frame'. The description should be no more than"
                            " six sentences." + _EXAMPLES),
}
DEFAULT_PROMPT = "video-f3-detail-3ex"


class CaptionError(RuntimeError):
    """The endpoint refused in a way that every row would share (key, model, URL)."""


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def encode_frames(frames, max_size: int | None = 512) -> list[str]:
    """uint8 frames -> data URLs of JPEGs, the longer side at most `max_size`."""
    from PIL import Image

    urls = []
    for frame in frames:
        image = Image.fromarray(frame)
        if max_size and max(image.size) > max_size:
            s = max_size / max(image.size)
            image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


class RateLimiter:
    """At most `rpm` request starts per minute, across threads (None: no limit)."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class Captioner:
    def __init__(self, *, base_url=None, model=None, api_key=None, prompt: str = DEFAULT_PROMPT, retries: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, rpm: float | None = None, timeout_s: float = TIMEOUT_S,
                 max_size: int | None = 512, max_tokens: int = MAX_TOKENS):  # fmt: skip
        if prompt not in PROMPTS:
            raise ValueError(f"--prompt {prompt!r}: choose one of {sorted(PROMPTS)}")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model or os.environ.get("OPENSORA_CAPTION_MODEL") or DEFAULT_MODEL
        self.api_key = api_key
        self.kind, self.points, self.prompt = PROMPTS[prompt]
        self.prompt_name = prompt
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.limiter = RateLimiter(rpm)
        self.timeout_s, self.max_size, self.max_tokens = timeout_s, max_size, max_tokens

    def message(self, row: dict) -> dict:
        from opensora_sdk.data.scoring import point_indices, read_frames, total_frames

        indices = [0] if table.is_image(row["path"]) else point_indices(self.points, total_frames(row))
        text = self.prompt.replace("{}", str(row.get("text", ""))) if "{}" in self.prompt else self.prompt
        content = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": u}} for u in encode_frames(read_frames(row, indices), self.max_size)]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens}

    def request(self, body: dict) -> str:
        """POST with retries; the caption text (newlines as spaces)."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    answer = json.loads(resp.read().decode("utf-8"))
                text = answer["choices"][0]["message"]["content"]
                return " ".join(str(text).replace("\n", " ").split())
            except urllib.error.HTTPError as err:
                detail = _redact(err.read()[:300].decode("utf-8", "replace"), self.api_key)
                if err.code in FATAL_STATUS:
                    raise CaptionError(f"{url} answered {err.code} ({detail.strip() or err.reason}): check the key, --model "
                                       f"{self.model!r} and --base-url") from None  # fmt: skip
                if err.code != 429 and err.code < 500:
                    raise ValueError(f"HTTP {err.code}: {detail.strip() or err.reason}") from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                last = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = _redact(f"{type(err).__name__}: {getattr(err, 'reason', err)}", self.api_key)
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                raise ValueError(f"unexpected answer from {url}: {type(err).__name__} {err}") from None
            if attempt == self.retries:
                break
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            try:
                delay = max(delay, float(retry_after)) if retry_after else delay
            except ValueError:
                pass
            time.sleep(delay)
        raise ValueError(f"gave up after {self.retries + 1} tries: {last}")

    def caption(self, row: dict) -> tuple[dict | None, str]:
        try:
            return {"text": self.request(self.message(row))}, ""
        except CaptionError:
            raise
        except Exception as err:  # noqa: BLE001 - this row failed; a re-run tries it again
            return None, _redact(f"{type(err).__name__}: {err}", self.api_key)


def caption_csv(meta, output=None, *, captioner: Captioner, concurrency: int = 1, progress: bool = True,
                overwrite: bool = False) -> dict:  # fmt: skip
    """Caption every row of `meta`; see the module docstring."""
    columns, rows = table.read_meta(meta)
    written = [r["path"] for r in rows]
    for row in rows:
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else (Path(meta).parent / p).resolve())
    kinds = {table.is_image(r["path"]) for r in rows[:1]}
    if kinds == {True} and captioner.kind == "video" or kinds == {False} and captioner.kind == "image":
        raise ValueError(f"--prompt {captioner.prompt_name} is for {captioner.kind}s but the first row is "
                         f"{'an image' if True in kinds else 'a video'} ({written[0]})")  # fmt: skip
    output = Path(output) if output else table.suffixed(meta, "caption")
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    journal = table.Journal(folder, ["text"], meta={"command": "caption", **table.input_identity(meta), "model": captioner.model,
                                                    "base_url": captioner.base_url, "prompt": captioner.prompt_name})  # fmt: skip
    finished = {i for i, r in journal.done().items() if not r.get(table.ERROR)}
    todo = [i for i in range(len(rows)) if i not in finished]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="caption", disable=not progress, file=sys.stderr)
    lock = threading.Lock()

    def one(i):
        result, error = captioner.caption(rows[i])
        with lock:
            journal.add(i, result, error)
            bar.update()

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        for future in [pool.submit(one, i) for i in todo]:
            future.result()  # CaptionError stops the run here (finished rows stay journaled)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    ok, bad = split_done(journal.done())
    out_rows = [{**r, "path": written[i], "text": ok[i]["text"]} for i, r in enumerate(rows) if i in ok]
    errors = [(written[i], bad[i]) for i in sorted(bad)]
    table.write_rows(out_rows, output, table.merged_columns(columns, ["text"]))
    errors_path = table.suffixed(output, "errors")
    if errors:
        table.write_rows([{"path": p, "error": e} for p, e in errors], errors_path, ["path", "error"])
        print(f"{len(errors)} row(s) failed; run the same command again to retry them", file=sys.stderr)
    else:
        errors_path.unlink(missing_ok=True)
        table.remove_parts(folder)
    report_errors(errors, errors_path, what="uncaptioned")
    return {"output": output, "rows": len(out_rows), "errors": len(errors), "errors_path": errors_path if errors else None}
