"""Prompt refinement (`opensora_sdk.refine`, `--llm-refine`, the ComfyUI node) against a small
chat-completions server on 127.0.0.1 (tests/chat_server.py): success, slow -> timeout, error
status, malformed reply, retries, fallback, image-to-video, and the key never shown."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from chat_server import IMAGE_REPLY, RANDOM_REPLY, ChatServer
from PIL import Image

from opensora_sdk.refine import (
    RefineEndpoint,
    RefineError,
    RefineWarning,
    available,
    random_prompt,
    refine_prompt,
    tidy,
)

KEY = "sk-test-SECRET-0123456789"


@pytest.fixture(scope="module")
def server():
    with ChatServer(slow_s=1.5) as s:
        yield s


def endpoint(server, model="ok", **kwargs) -> RefineEndpoint:
    return RefineEndpoint(api_key=KEY, base_url=server.base_url, model=model, **kwargs)


def last(server) -> dict:
    return server.requests[-1]


def test_refines_into_one_english_line_and_sends_the_key_only_in_the_header(server):
    text = refine_prompt("ein Hund am Strand", endpoint=endpoint(server))
    assert text == "A detailed English video of ein Hund am Strand. The camera stays still."
    request = last(server)
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    system, user = request["body"]["messages"]
    assert system["role"] == "system" and "English" in system["content"] and "six sentences" in system["content"]
    assert user == {"role": "user", "content": "ein Hund am Strand"}
    assert request["body"]["model"] == "ok"
    assert KEY not in json.dumps(request["body"])
    assert KEY not in repr(endpoint(server))


def test_empty_prompt_asks_for_a_random_one(server):
    assert refine_prompt("  ", endpoint=endpoint(server)) == RANDOM_REPLY
    assert last(server)["body"]["messages"][-1]["content"] == "Generate one example."
    assert random_prompt(endpoint=endpoint(server)) == RANDOM_REPLY


def test_loop_segments_refined_one_by_one_and_inline_json_kept(server):
    before = len(server.requests)
    out = refine_prompt('|0|a cat|2| {"reference_path": "x.png"}', endpoint=endpoint(server))
    assert out == f'|0|A detailed English video of a cat. The camera stays still.|2|{RANDOM_REPLY} {{"reference_path": "x.png"}}'
    assert len(server.requests) == before + 2


def test_image_to_video_shows_the_model_the_image(server, tmp_path):
    path = tmp_path / "first.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    text = refine_prompt("it moves", image=path, endpoint=endpoint(server))
    assert text == "A red circle on a black background that slowly moves to the right."  # "The video shows" removed
    body = last(server)["body"]
    system, user = body["messages"]
    assert "first frame" in system["content"] and "it moves" in system["content"]
    part = user["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["detail"] == "low"
    url = part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (60, 40)
    assert body["max_tokens"] == 300
    # a ComfyUI IMAGE frame (float in [0, 1]) works too
    assert refine_prompt("", image=np.zeros((8, 8, 3), np.float32), endpoint=endpoint(server)) == text


def test_slow_server_times_out_after_the_retries(server):
    before = len(server.requests)
    start = time.monotonic()
    with pytest.raises(RefineError, match=r"no answer within 0\.3 s \(2 tries"):
        refine_prompt("a cat", endpoint=endpoint(server, "slow", timeout=0.3, retries=1))
    assert time.monotonic() - start < 1.5  # 2 x 0.3 s + a 0.5 s pause, not the server's 1.5 s each
    assert len(server.requests) == before + 2


def test_error_status_is_reported_without_retrying_and_without_the_key(server):
    before = len(server.requests)
    with pytest.raises(RefineError) as info:
        refine_prompt("a cat", endpoint=endpoint(server, "unauthorized"))
    message = str(info.value)
    assert "HTTP 401: Incorrect API key provided" in message and server.base_url in message
    assert KEY not in message and "\n" not in message
    assert len(server.requests) == before + 1


def test_server_errors_are_retried(server):
    assert refine_prompt("a cat", endpoint=endpoint(server, "flaky", retries=1)).startswith("A detailed")
    with pytest.raises(RefineError, match="HTTP 500: the server had an error .2 tries"):
        refine_prompt("a cat", endpoint=endpoint(server, "error", retries=1))


def test_malformed_reply(server):
    with pytest.raises(RefineError, match=r"malformed reply .* choices\[0\]\.message\.content"):
        refine_prompt("a cat", endpoint=endpoint(server, "broken"))


def test_unreachable_server():
    dead = RefineEndpoint(api_key=KEY, base_url="http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(RefineError, match="cannot connect"):
        refine_prompt("a cat", endpoint=dead)


def test_fallback_keeps_the_original_prompt_with_a_warning(server):
    with pytest.warns(RefineWarning, match="keeping the original prompt 'ein Hund'"):
        assert refine_prompt("ein Hund", endpoint=endpoint(server, "broken"), fallback=True) == "ein Hund"
    with pytest.raises(RefineError):  # nothing to fall back to
        refine_prompt("", endpoint=endpoint(server, "broken"), fallback=True)


def test_endpoint_from_env_and_a_clear_error_without_a_key():
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://localhost:8000/v1/", "OPENSORA_REFINE_MODEL": "m"}
    e = RefineEndpoint.from_env(environ=env)
    assert (e.api_key, e.base_url, e.model, e.url) == (KEY, "http://localhost:8000/v1", "m",
                                                       "http://localhost:8000/v1/chat/completions")
    assert RefineEndpoint.from_env(model="x", environ=env).model == "x"
    assert RefineEndpoint.from_env(environ={"OPENAI_API_KEY": KEY}).model == "gpt-4o"
    with pytest.raises(RefineError, match="needs an API key: set OPENAI_API_KEY"):
        RefineEndpoint.from_env(environ={"OPENSORA_REFINE_MODEL": "m"})
    assert not available({}) and available(env)
    assert RefineEndpoint.from_env(environ={"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).api_key is None  # local


def test_tidy():
    assert tidy('Refined prompt: "a cat | on a {mat}."\n') == "a cat on a mat ."
    assert tidy("The image depicts a dog.") == "A dog."


# --------------------------------------------------------------------------------------------
# The ComfyUI node
# --------------------------------------------------------------------------------------------


def test_comfy_node_refines_with_the_key_from_the_environment(server, monkeypatch):
    import torch

    from comfy_nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["OpenSoraPromptRefine"]()
    assert "api_key" not in node.INPUT_TYPES()["required"]  # never a widget: widgets are saved in files
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    (text,) = node.refine("ein Hund", "ok", server.base_url, False, 10.0)
    assert text.startswith("A detailed English video of ein Hund")
    assert last(server)["headers"]["Authorization"] == f"Bearer {KEY}"
    (text,) = node.refine("", "ok", server.base_url, False, 10.0, image=torch.rand(2, 16, 16, 3))
    assert text == tidy(IMAGE_REPLY)
