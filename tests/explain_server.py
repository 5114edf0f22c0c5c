"""A chat-completions server on loopback for the explain tests: the OpenAI protocol over real HTTP (POST
/v1/chat/completions), answering with a responder function, and misbehaving on request: 429, 5xx, a stalled reply,
a malformed body, a garbage answer, a hang-up (the connection closed with no reply, as a crashed server does). It
logs every request, so tests count what the client sent."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

FAULTS = ("401", "429", "500", "500-echo-key", "stall", "malformed", "garbage", "hangup")
GARBAGE = "I would rather not say; it is complicated."


class ChatServer:
    """`with ChatServer(responder) as server:` serves `server.url`. `server.inject(fault, match=None, times=1)`
    makes the next `times` requests whose serialized messages contain `match` (any, if None) misbehave."""

    def __init__(self, responder: Callable[[list[dict]], str], delay: float = 0.0, stall_s: float = 2.0):
        self.responder = responder
        self.delay = delay  # seconds each answer takes, so concurrent requests overlap
        self.stall_s = stall_s
        self.log: list[dict] = []  # {"messages", "auth", "status", "fault"} per request, in arrival order
        self._faults: list[list] = []  # [fault, match, times left]
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.down = False  # every request gets a 503 while set
        self._httpd: Optional[ThreadingHTTPServer] = None

    def inject(self, fault: str, match: Optional[str] = None, times: int = 1) -> None:
        assert fault in FAULTS, fault
        with self._lock:
            self._faults.append([fault, match, times])

    def answered(self) -> list[list[dict]]:
        """Messages of the requests that got a well-formed answer."""
        with self._lock:
            return [r["messages"] for r in self.log if r["status"] == 200 and r["fault"] is None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "ChatServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._handle(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a stalled reply
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _take_fault(self, messages: list[dict]) -> Optional[str]:
        text = json.dumps(messages)
        with self._lock:
            for f in self._faults:
                if f[2] > 0 and (f[1] is None or f[1] in text):
                    f[2] -= 1
                    return f[0]
        return None

    def _handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        messages = body.get("messages", [])
        fault = "503" if self.down else self._take_fault(messages)
        entry = {"messages": messages, "auth": h.headers.get("Authorization"), "fault": fault, "status": 200}
        with self._lock:
            self.log.append(entry)
        if self.delay:
            time.sleep(self.delay)
        if fault in ("401", "429", "500", "503", "500-echo-key"):
            status = int(fault[:3])
            detail = f"server saw {h.headers.get('Authorization')}" if fault == "500-echo-key" else "try later"
            entry["status"] = status
            self._send(h, status, json.dumps({"error": {"message": detail, "type": "server_error"}}).encode(),
                       {"Retry-After": "0"} if status == 429 else {})
            return
        if fault == "hangup":
            h.close_connection = True  # nothing written: the client reads end of stream where the reply should be
            return
        if fault == "stall":
            time.sleep(self.stall_s)
        if fault == "malformed":
            self._send(h, 200, b'{"id": "x", "choices": [{"message": ')
            return
        content = GARBAGE if fault == "garbage" else self.responder(messages)
        reply = {
            "id": f"chatcmpl-{len(self.log)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict = {}) -> None:  # noqa: B006
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)
