"""`opensora app`: the web app, a Gradio page over `OpenSoraPipeline`.

    pip install -e ".[app]"
    opensora app                              # the built-in model: offline, CPU, seconds a clip
    opensora app --preset v1.2 --port 7860    # the released weights (a GPU), any model option of `generate`

It offers the official demo's controls (spec 4.2: prompt, LLM refinement and a random prompt,
resolution, aspect ratio, length, seed, steps, CFG, motion strength and aesthetic score each
with an on/off switch, camera motion, fps, loops, a reference image, "Generate image" whose
result becomes the reference for a following "Generate video"), plus a negative prompt, a
prompt per loop, a last frame and a video to extend. Steps show as a progress bar, a second
request waits in the queue, Stop cancels a running generation at its next step, and bad input
shows the SDK's one-line message in the page.

The page is a thin adapter: `Request` holds the page's values, `call_arguments` turns them
into `OpenSoraPipeline.plan()` arguments, `Backend.run` plans, generates and saves. Only
`build_demo` and `cmd_app` touch Gradio, which is imported when the command runs (the SDK
never imports it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from opensora_sdk.text import CAMERA_MOTIONS

INSTALL_HINT = 'the web app needs Gradio: pip install -e ".[app]" (or pip install "gradio>=4")'
log = logging.getLogger("opensora_sdk.app")

# The official demo's choices (spec 4.2).
RESOLUTIONS = ("144p", "240p", "360p", "480p", "720p")
ASPECT_RATIOS = ("9:16", "16:9", "3:4", "4:3", "1:1")
LENGTHS = {"2s": 51, "4s": 102, "8s": 204, "16s": 408}
CAMERA_CHOICES = ("none", *CAMERA_MOTIONS)
CACHE_CHOICES = ("none", "teacache:0.1", "teacache:0.2", "pab")  # step caching (the box also takes other forms)
DEFAULT = "default"  # the model's own size / length (the built-in model: 64x64, 17 frames)
ASPECT_INFO = ("height:width, as the official tables: 9:16 is landscape (wide), 16:9 portrait (tall), 1:1 square; "
               "used with a resolution")


@dataclass
class Request:
    """The values of the page for one generation ("video" or "image" mode)."""

    prompt: str = ""
    mode: str = "video"
    negative_prompt: str = ""
    loop_prompts: str = ""  # one line per loop; overrides prompt when given
    resolution: str = DEFAULT
    aspect_ratio: str = "9:16"
    length: str = DEFAULT
    seed: int = 1024
    random_seed: bool = False
    steps: int = 30
    cfg: float = 7.0
    motion_enabled: bool = False
    motion: float = 5.0
    aes_enabled: bool = True
    aes: float = 6.5
    camera: str = "none"
    fps: float = 24.0
    loops: int = 1
    reference: str | None = None  # first frame (image path)
    last_frame: str | None = None  # last frame (image path)
    extend: str | None = None  # video to continue (path)
    refine: bool = False
    cache: str = "none"  # step caching ("none", "teacache:0.1", "pab", ...; opensora_sdk.step_cache)


@dataclass
class Result:
    path: Path
    seed: int
    prompt: str  # what the model got before suffixes (the refined prompt when refined)
    refined: str | None
    message: str


def loop_prompt(req: Request) -> str:
    """The prompt text: the per-loop lines as ``|0|a|1|b``, else the prompt box."""
    lines = [line.strip() for line in (req.loop_prompts or "").splitlines() if line.strip()]
    if len(lines) > 1:
        return "".join(f"|{i}|{line}" for i, line in enumerate(lines))
    return lines[0] if lines else (req.prompt or "").strip()


def condition_frame_length(num_frames: int | None) -> int:
    """Latent frames carried into the next loop: the demo's int(N / 17 * 5 / 3), kept to whole
    chunks of 5 (51 frames -> 5, 102 -> 10); 5 for the model's default length."""
    if num_frames is None:
        return 5
    return max(5, int(num_frames / 17 * 5 / 3) // 5 * 5)


def call_arguments(pipe, req: Request, prompt: str) -> dict[str, Any]:
    """`pipe.plan(prompt, **kwargs)` arguments for a request (the demo's mapping, spec 4.3)."""
    from opensora_sdk.conditioning import ImageCondition

    image = req.mode == "image"
    sized = req.resolution not in (None, "", DEFAULT)
    num_frames = 1 if image else (None if req.length in (None, "", DEFAULT) else LENGTHS[req.length])
    loops = 1 if image else int(req.loops)
    kwargs: dict[str, Any] = dict(
        negative_prompt=req.negative_prompt or None,
        resolution=req.resolution if sized else None,
        aspect_ratio=req.aspect_ratio if sized else None,
        num_frames=num_frames,
        fps=float(req.fps),
        num_steps=int(req.steps),
        guidance_scale=float(req.cfg),
        aesthetic_score=float(req.aes) if req.aes_enabled else None,
        motion_score=float(req.motion) if req.motion_enabled and not image else None,
        camera_motion=None if image or req.camera in (None, "", "none") else req.camera,
        seed=None if req.random_seed else int(req.seed),
        loop=loops,
        condition_frame_length=condition_frame_length(num_frames),
    )
    if req.cache not in (None, "", "none"):  # step caching: only when asked (v1.2 models)
        kwargs["cache"] = req.cache
    conditions = []
    if not image:
        if req.reference and req.extend:
            raise ValueError("give a first-frame image or a video to extend, not both (both set the first frames)")
        if req.reference:
            conditions.append(ImageCondition(req.reference, frame=0))
        if req.extend:
            conditions.append(_extension(pipe, req.extend, pipe.plan(prompt, **kwargs).latent_size[0]))
        if req.last_frame:
            conditions.append(ImageCondition(req.last_frame, frame=-1))
    kwargs["conditions"] = conditions
    return kwargs


def _extension(pipe, path: str, output_latents: int):
    """The end of an uploaded video as the start of the new clip: its last latent frames (up to
    one VAE chunk, leaving at least one chunk, or one frame, to generate)."""
    from opensora_sdk.conditioning import VideoCondition, default_span
    from opensora_sdk.video_io import read_video

    frames, _ = read_video(path)
    ref_latents = pipe.facts.latent_size(len(frames), None, None)[0]
    span = min(default_span(5, output_latents, 0), ref_latents)
    return VideoCondition(path, ref_start=-span, target_start=0, length=span)


class Backend:
    """What the page runs: refine, plan, generate (one at a time), save. No Gradio here."""

    def __init__(self, pipe, output_dir, *, endpoint=None, refine_fallback: bool = False, watermark=None):
        self.pipe = pipe
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = endpoint  # a RefineEndpoint or None
        self.refine_fallback = refine_fallback
        self.watermark = watermark
        self.lock = threading.Lock()  # one generation at a time, also after a cancelled one
        self.last_outcome = None  # "done", "stopped" or "failed" (for tests and logs)
        self.runs: list[tuple[float, float]] = []  # (start, end) of each generation, monotonic seconds

    def defaults(self) -> dict[str, Any]:
        """The model's defaults for the page's sliders (its preset's, else its family's)."""
        table = {**self.pipe.family.defaults, **self.pipe.defaults}
        return {"steps": table["num_steps"], "cfg": table["guidance_scale"], "fps": table["fps"],
                "aes_enabled": table.get("aesthetic_score") is not None,
                "native": (table["height"], table["width"]) if table.get("height") else None,
                "num_frames": table["num_frames"]}

    def refine(self, prompt: str, image=None, warn: Callable[[str], None] | None = None) -> str:
        """The prompt rewritten by the LLM; with `refine_fallback`, failures go to `warn`."""
        from opensora_sdk.refine import refine_prompt

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = refine_prompt(prompt, image=image, endpoint=self.endpoint, fallback=self.refine_fallback)
        for w in caught:
            (warn or log.warning)(str(w.message))
        return text

    def run(self, req: Request, report: Callable[[int, int], None] | None = None,
            stop: threading.Event | None = None, warn: Callable[[str], None] | None = None) -> Result | None:
        """One generation; None when `stop` was set during it. Every input is checked (the
        SDK's plan) before the LLM or a model runs."""
        from opensora_sdk.generation import Timings
        from opensora_sdk.sampling import SamplingInterrupted

        prompt, refined = loop_prompt(req), None
        refine = req.refine and self.endpoint is not None
        if req.refine and not refine and warn:
            warn("no LLM endpoint is configured (set OPENAI_API_KEY or start with --llm-refine-base-url); "
                 "the prompt is used as written")
        if refine:  # check the rest first (an empty prompt, which the LLM fills, as a stand-in)
            stand_in = prompt if prompt.strip() else "a video"
            self.pipe.plan(stand_in, **call_arguments(self.pipe, req, stand_in))
            refined = prompt = self.refine(prompt, req.reference if req.mode == "video" else None, warn)
        plan = self.pipe.plan(prompt, **call_arguments(self.pipe, req, prompt))  # before the lock and any model

        def callback(step, total, latent, denoised):
            if report is not None:
                report(step + 1, total)
            return not (stop is not None and stop.is_set())

        with self.lock:
            if stop is not None and stop.is_set():
                self.last_outcome = "stopped"
                return None
            start = time.monotonic()
            try:
                timings = Timings()  # with a step cache: what it skipped (timings.cache_stats)
                video = self.pipe.generate(plan, callback=callback, progress=False, timings=timings)[0]
            except SamplingInterrupted:
                self.last_outcome = "stopped"
                return None
            except BaseException:
                self.last_outcome = "failed"
                raise
            if refined is not None:
                video.metadata.update(original_prompt=loop_prompt(req), refined_prompt=refined)
            path = self._save(video)
            self.last_outcome = "done"
            self.runs.append((start, time.monotonic()))
        seed = plan.seeds[0]
        what = "image" if video.num_frames == 1 else f"{video.num_frames} frames at {video.fps:g} fps"
        message = f"seed {seed}, {video.height}x{video.width}, {what}: {path.name}"
        if timings.cache_stats is not None:
            message += f" ({timings.cache_stats.summary()})"
        return Result(path, seed, prompt, refined, message)

    def _save(self, video) -> Path:
        """{output}/output_{unix time in ms}.mp4 (.png for an image), watermarked if asked."""
        from opensora_sdk.outputs import add_watermark, watermark_path

        path = self.output_dir / f"output_{int(time.time() * 1000)}{video.default_suffix}"
        video.save(path)
        if self.watermark is not None and path.suffix == ".mp4":
            path = add_watermark(path, self.watermark, watermark_path(path, "_watermarked"))
        return path


# --------------------------------------------------------------------------------------------
# The page (Gradio)
# --------------------------------------------------------------------------------------------

# Errors a user's input causes; shown as their one-line message.
def _user_errors():
    from opensora_sdk.loading import CheckpointError

    return (ValueError, TypeError, OSError, CheckpointError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _kw(factory, **kwargs):
    """Only the keyword arguments this Gradio version's component accepts (Gradio 4 to 6)."""
    import inspect

    accepted = inspect.signature(factory.__init__).parameters
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})


FIELDS = [f.name for f in dataclasses.fields(Request) if f.name != "mode"]


def build_demo(backend: Backend, *, refine_default: bool = False):
    """The Gradio Blocks of the app (not launched). API names: /generate_video, /generate_image,
    /random_prompt; inputs in the order of `FIELDS`."""
    import inspect

    import gradio as gr

    d = backend.defaults()
    native = d["native"]
    has_llm = backend.endpoint is not None
    res_choices = ([(f"model default ({native[0]}x{native[1]})", DEFAULT)] if native else []) + list(RESOLUTIONS)
    len_choices = [(f"model default ({d['num_frames']} frames)", DEFAULT)] + list(LENGTHS)

    with gr.Blocks(title="Open-Sora") as demo:
        gr.Markdown("## Open-Sora\nText, image or video in, video out. Model: "
                    f"`{backend.pipe.sources.get('preset') or backend.pipe.sources.get('transformer', '?')}`.")
        with gr.Row():
            with gr.Column():
                c: dict[str, Any] = {}
                c["prompt"] = gr.Textbox(label="Prompt", lines=4, placeholder="Describe your video here",
                                         elem_id="prompt")
                with gr.Row():
                    c["refine"] = gr.Checkbox(label="Refine prompt with an LLM", value=refine_default and has_llm,
                                              interactive=has_llm,
                                              info="rewritten into a detailed English description first (any "
                                                   "language works)" if has_llm else "set OPENAI_API_KEY to enable")
                    random_btn = gr.Button("Random prompt", interactive=has_llm, size="sm")
                c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1,
                                                  placeholder="what the video should not show (optional)")
                c["resolution"] = gr.Radio(res_choices, value=DEFAULT if native else "480p", label="Resolution")
                c["aspect_ratio"] = gr.Radio(list(ASPECT_RATIOS), value="9:16", label="Aspect ratio (H:W)",
                                             info=ASPECT_INFO)
                c["length"] = gr.Radio(len_choices, value=DEFAULT if native else "2s", label="Video length",
                                       info="2s/4s/8s/16s = 51/102/204/408 frames per loop")
                with gr.Row():
                    c["seed"] = gr.Slider(1, 2048, value=1024, step=1, label="Seed")
                    c["random_seed"] = gr.Checkbox(label="Random seed", value=False)
                c["steps"] = gr.Slider(1, 200, value=d["steps"], step=1, label="Sampling steps", elem_id="steps")
                c["cfg"] = gr.Slider(0.0, 10.0, value=d["cfg"], step=0.1, label="CFG scale")
                with gr.Row():
                    c["motion"] = gr.Slider(0, 100, value=5, step=1, label="Motion strength")
                    c["motion_enabled"] = gr.Checkbox(label="Enable", value=False, info="video only")
                with gr.Row():
                    c["aes"] = gr.Slider(4.0, 7.0, value=6.5, step=0.1, label="Aesthetic score")
                    c["aes_enabled"] = gr.Checkbox(label="Enable", value=d["aes_enabled"])
                c["camera"] = gr.Radio(list(CAMERA_CHOICES), value="none", label="Camera motion")
                with gr.Accordion("Advanced", open=False):
                    c["fps"] = gr.Slider(1, 60, value=d["fps"], step=1, label="FPS")
                    c["loops"] = gr.Slider(1, 20, value=1, step=1, label="Number of loops",
                                           info="each loop continues the last one")
                    c["loop_prompts"] = gr.Textbox(label="Prompt per loop", lines=3,
                                                   placeholder="one line per loop (overrides Prompt); or write "
                                                               "|0|first|2|from loop 2 on in Prompt")
                    c["cache"] = _kw(gr.Dropdown, choices=list(CACHE_CHOICES), value="none", label="Step cache",
                                     allow_custom_value=True,
                                     info="faster, approximate: teacache:T skips the transformer at steps that "
                                          "barely change (higher T = faster); pab reuses attention over steps")
            with gr.Column():
                c["reference"] = _kw(gr.Image, label="Reference image (first frame)", type="filepath", format="png",
                                     sources=["upload", "clipboard"], elem_id="reference")
                with gr.Accordion("Last frame, video extension", open=False):
                    c["last_frame"] = _kw(gr.Image, label="Last frame", type="filepath", format="png",
                                          sources=["upload", "clipboard"])
                    c["extend"] = _kw(gr.Video, label="Video to extend (the new clip starts where it ends)",
                                      sources=["upload"])
                with gr.Row():
                    image_btn = gr.Button("Generate image", elem_id="generate-image")
                    video_btn = gr.Button("Generate video", variant="primary", elem_id="generate-video")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                output = _kw(gr.Video, label="Output video", elem_id="output-video", autoplay=False, interactive=False,
                             height=400)
                refined = gr.Textbox(label="Refined prompt", interactive=False, visible=has_llm)
                status = gr.Markdown(label="status", elem_id="status")
        inputs = [c[name] for name in FIELDS]

        def handler(mode: str):
            async def run(*values, progress=gr.Progress()):
                if len(values) > len(FIELDS):  # Gradio passed the tracker positionally
                    progress = values[len(FIELDS)]
                req = Request(**dict(zip(FIELDS, values[:len(FIELDS)])), mode=mode)
                stop = threading.Event()

                def report(done, total):
                    progress((done, total), desc="sampling", unit="steps")

                try:
                    progress(0, desc="preparing")
                    result = await asyncio.to_thread(backend.run, req, report, stop, gr.Warning)
                except asyncio.CancelledError:
                    stop.set()
                    raise
                except _user_errors() as err:
                    raise gr.Error(_one_line(err)) from None
                except Exception as err:  # a bug: the page gets one line, the console the traceback
                    log.exception("generation failed")
                    raise gr.Error(f"internal error: {type(err).__name__}: {_one_line(err)}") from None
                if result is None:
                    raise gr.Error("stopped")
                return str(result.path), result.refined or "", result.message

            run.__name__ = f"generate_{mode}"
            # named parameters (Request's fields) for the API page and gradio_client keywords
            params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in FIELDS]
            params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=gr.Progress()))
            run.__signature__ = inspect.Signature(params)
            return run

        video_event = video_btn.click(handler("video"), inputs, [output, refined, status], api_name="generate_video")
        image_event = image_btn.click(handler("image"), inputs, [c["reference"], refined, status],
                                      api_name="generate_image")
        stop_btn.click(None, None, None, cancels=[video_event, image_event])

        async def random_prompt(reference):
            if backend.endpoint is None:
                gr.Warning("no LLM endpoint is configured (set OPENAI_API_KEY)")
                return gr.update()
            try:
                return await asyncio.to_thread(backend.refine, "", reference, gr.Warning)
            except _user_errors() as err:
                raise gr.Error(_one_line(err)) from None

        random_btn.click(random_prompt, [c["reference"]], [c["prompt"]], api_name="random_prompt")
    return demo


def cmd_app(args) -> int:
    """`opensora app`: load the model once, serve the page until Ctrl+C."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no usage reports
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(f"opensora app: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from opensora_sdk import cli_refine
    from opensora_sdk.cli_generate import _load_pipeline
    from opensora_sdk.cli_plan import _device_and_dtype
    from opensora_sdk.outputs import check_watermark_image
    from opensora_sdk.refine import RefineError

    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: expected 1..65535")
    watermark = None if args.watermark is None else check_watermark_image(args.watermark)
    try:
        endpoint = cli_refine.endpoint(args)
    except RefineError:
        if args.llm_refine:
            raise
        endpoint = None  # the page's refine controls stay off
    device, dtype = _device_and_dtype(args)
    print("loading the model ...", file=sys.stderr)
    pipe = _load_pipeline(args, device, dtype)
    backend = Backend(pipe, args.output, endpoint=endpoint, refine_fallback=args.llm_refine_fallback,
                      watermark=watermark)
    demo = build_demo(backend, refine_default=bool(args.llm_refine))
    demo.queue(max_size=64).launch(server_name=args.host, server_port=args.port, share=args.share,
                                   allowed_paths=[str(backend.output_dir.resolve())], show_error=False)
    return 0


__all__ = ["Backend", "Request", "Result", "build_demo", "call_arguments", "cmd_app"]
