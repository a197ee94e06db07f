"""A small chat-completions server on 127.0.0.1 for the prompt-refinement tests.

The requested `model` picks the behaviour:

    ok          200, "A detailed English video of <user text>." (+ a newline, to test tidying);
                an empty-prompt request ("Generate one example.") gets RANDOM_REPLY, an image
                request IMAGE_REPLY
    slow        sleeps `slow_s` before answering (timeouts)
    unauthorized 401 with an OpenAI-style error body
    flaky       503 on the first request, then as ok
    broken      200 with a body that is not a chat completion
    error       500 every time

Every request is recorded (path, headers, parsed body) in `server.requests`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANDOM_REPLY = "a golden retriever runs along a sunny beach, waves rolling in behind it."
IMAGE_REPLY = "The video shows a red circle on a black background that slowly moves to the right."


def reply_for(body: dict) -> str:
    user = body["messages"][-1]["content"]
    if isinstance(user, list):
        return IMAGE_REPLY
    if user == "Generate one example.":
        return RANDOM_REPLY
    return f'"A detailed English video of {user}.\nThe camera stays still."'


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, slow_s: float = 2.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.slow_s = slow_s
        self.flaky_failed = False
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        model = body.get("model")
        if model == "slow":
            time.sleep(self.server.slow_s)
        elif model == "unauthorized":
            return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        elif model == "error":
            return self._send(500, {"error": {"message": "the server had an error"}})
        elif model == "flaky" and not self.server.flaky_failed:
            self.server.flaky_failed = True
            return self._send(503, {"error": {"message": "overloaded"}})
        elif model == "broken":
            return self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
        self._send(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply_for(body)}}],
        })
