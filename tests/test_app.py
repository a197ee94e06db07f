"""`opensora app`: the Gradio page on the built-in model, driven for real: its API through
gradio_client (generate, image then animate, extension and last frame, errors as one-line
messages, the queue, Stop, LLM refinement against tests/chat_server.py) and the page itself in
headless Chromium (type a prompt, generate, a playable <video>). Skips without gradio; the
browser test skips without selenium or Debian's chromium + chromium-driver."""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
from chat_server import RANDOM_REPLY, ChatServer
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason='the web app needs gradio: pip install -e ".[app]"')
client_lib = pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")

from opensora_sdk import cli, cli_generate  # noqa: E402
from opensora_sdk.app import Backend, build_demo  # noqa: E402
from opensora_sdk.refine import RefineEndpoint  # noqa: E402
from opensora_sdk.video import Video  # noqa: E402

FAST = {"steps": 2}


@pytest.fixture(scope="module")
def chat():
    with ChatServer() as s:
        yield s


@pytest.fixture(scope="module")
def app(tmp_path_factory, chat):
    """(backend, client, url) of one running app on the built-in model."""
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset(device="cpu", progress=False)
    endpoint = RefineEndpoint(api_key="sk-test", base_url=chat.base_url, model="ok", timeout=10)
    backend = Backend(pipe, tmp_path_factory.mktemp("outputs"), endpoint=endpoint)
    demo = build_demo(backend)
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(backend.output_dir)])
    client = client_lib.Client(demo.local_url, verbose=False)
    yield backend, client, demo.local_url
    if hasattr(client, "close"):
        client.close()
    demo.close()


def test_generate_video_through_the_api(app):
    backend, client, _ = app
    path, refined, status = client.predict(prompt="a red circle moving right", **FAST, api_name="/generate_video")
    video = Video.from_file(path)
    assert (video.num_frames, video.height, video.width, video.fps) == (17, 64, 64, 8)
    assert refined == "" and status.startswith("seed 1024, 64x64, 17 frames at 8 fps: output_")
    saved = list(backend.output_dir.glob("output_*.mp4"))
    assert saved and Video.from_file(saved[0]).metadata["title"] == "a red circle moving right"


def test_bad_input_is_a_one_line_message(app):
    _, client, _ = app
    cases = [
        ({"prompt": ""}, "prompt='' is empty: give a text describing the video"),
        ({"prompt": "a cat", "length": "16s"}, "this model takes at most 10 per clip"),
        ({"prompt": 'a cat {"reference_path": "missing.png"}'}, "missing.png"),
        ({"prompt": "|0|a cat|0|a dog"}, "start loops must strictly increase"),
    ]
    for kwargs, message in cases:
        with pytest.raises(client_lib.exceptions.AppError) as info:
            client.predict(**kwargs, **FAST, api_name="/generate_video")
        assert message in str(info.value) and "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_generate_an_image_then_animate_it_then_extend_it(app, tmp_path):
    _, client, _ = app
    handle = client_lib.handle_file
    image, _, status = client.predict(prompt="a blue square", **FAST, api_name="/generate_image")
    assert image.endswith(".png") and Video.from_file(image).num_frames == 1 and "image" in status
    path, _, _ = client.predict(prompt="a blue square moving left", reference=handle(image), **FAST,
                                api_name="/generate_video")
    first = Video.from_file(path)
    assert first.num_frames == 17
    last = tmp_path / "last.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(last)
    path, _, status = client.predict(prompt="the square keeps moving", extend=handle(path), last_frame=handle(last),
                                     loops=2, **FAST, api_name="/generate_video")
    assert Video.from_file(path).num_frames == 34 + 17 and "seed 1024" in status  # two loops of 34, 17 shared
    with pytest.raises(client_lib.exceptions.AppError, match="not both"):
        client.predict(prompt="x", reference=handle(image), extend=handle(path), **FAST, api_name="/generate_video")


def test_refine_and_random_prompt_through_the_app(app, chat):
    _, client, _ = app
    path, refined, _ = client.predict(prompt="ein Hund", refine=True, **FAST, api_name="/generate_video")
    assert refined == "A detailed English video of ein Hund. The camera stays still."
    meta = Video.from_file(path).metadata
    assert meta["refined_prompt"] == refined and meta["original_prompt"] == "ein Hund"
    assert client.predict(None, api_name="/random_prompt") == RANDOM_REPLY
    before = len(chat.requests)
    with pytest.raises(client_lib.exceptions.AppError, match="at most 10 per clip"):
        client.predict(prompt="ein Hund", refine=True, length="16s", **FAST, api_name="/generate_video")
    assert len(chat.requests) == before  # bad input fails before the LLM is asked


def test_a_second_request_queues_and_stop_cancels(app):
    backend, client, _ = app
    first = client.submit(prompt="a cat", steps=30, api_name="/generate_video")
    second = client.submit(prompt="a dog", **FAST, api_name="/generate_video")
    assert first.result()[0].endswith(".mp4") and second.result()[0].endswith(".mp4")
    (_, first_end), (second_start, _) = backend.runs[-2:]
    assert second_start >= first_end  # the second request waited for the first (one generation at a time)

    before = set(backend.output_dir.iterdir())
    job = client.submit(prompt="a long one", steps=200, api_name="/generate_video")
    deadline = time.monotonic() + 240  # generous: a loaded 2-core CI machine
    while not (job.status().progress_data or time.monotonic() > deadline):  # sampling has started
        time.sleep(0.05)
    assert job.status().progress_data, "no step progress reached the page"
    job.cancel()
    deadline = time.monotonic() + 120
    while backend.last_outcome != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.last_outcome == "stopped"  # the generation itself ended, not only the request
    assert set(backend.output_dir.iterdir()) == before
    assert backend.lock.acquire(timeout=5)
    backend.lock.release()


def test_app_command_binds_to_localhost_and_names_the_extra(app, monkeypatch, capsys, tmp_path):
    args = cli.build_parser().parse_args(["app"])
    assert (args.host, args.port, args.share, args.output) == ("127.0.0.1", None, False, "./outputs")
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.setattr(cli_generate, "_load_pipeline", lambda *a, **k: app[0].pipe)
    assert cli.main(["app", "--output", str(tmp_path / "out"), "--port", "7999"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["allowed_paths"] == [str((tmp_path / "out").resolve())]
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # as if not installed
    assert cli.main(["app"]) == 2
    assert 'pip install -e ".[app]"' in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The page in headless Chromium
# --------------------------------------------------------------------------------------------


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_in_a_browser_plays_the_generated_video(app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, url = app
    browser = _browser()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("a red circle moving right")
        steps = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.CSS_SELECTOR, "#generate-video").click()
        video = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#output-video video[src]"))
        src = video.get_attribute("src")
        assert src.startswith(url.rstrip("/")) and src.endswith(".mp4")
        with urllib.request.urlopen(src, timeout=30) as response:
            data = response.read()
        assert data[4:8] == b"ftyp"  # an MP4 file is served
        state = wait.until(lambda b: b.execute_script(
            "const v = arguments[0]; return v.readyState >= 1 ? [v.duration, v.videoWidth, v.error] : null", video))
        assert state[0] == pytest.approx(17 / 8, abs=0.1) and state[1] == 64 and state[2] is None  # it plays
        assert "seed 1024, 64x64" in browser.find_element(By.CSS_SELECTOR, "#status").text
        box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        browser.find_element(By.CSS_SELECTOR, "#generate-video").click()  # bad input: a message in the page
        wait.until(lambda b: "is empty: give a text describing the video" in b.page_source)
        assert "Traceback" not in browser.page_source
    finally:
        browser.quit()


def test_backend_stops_at_the_next_step(app):
    """Backend.run stops at the next step once its stop event is set (what Stop triggers)."""
    from opensora_sdk.app import Request

    backend, _, _ = app
    stop = threading.Event()
    steps = []

    def report(done, total):
        steps.append(done)
        if done == 2:
            stop.set()

    assert backend.run(Request(prompt="a cat", steps=50, fps=8), report, stop) is None
    assert steps == [1, 2] and backend.last_outcome == "stopped"
