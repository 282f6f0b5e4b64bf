"""A stand-in for a model API over TLS (run by the tests in a network namespace of theirs).

Every request's method, path and credential headers are appended to a JSON-lines file.
POST /v1/messages (the Anthropic Messages API, streamed or not) answers first with a call
of the Bash tool running the command given on our command line, then, once the request
carries its tool_result, with a short text. POST /v1/responses (OpenAI's Responses API, as
Codex streams it) and Gemini's `:streamGenerateContent` / `:generateContent` answer one
text turn, `fake-model-done`. A WebSocket upgrade (Codex tries one first) gets 404, so the
client falls back to plain HTTPS. Anything else gets `{}`.
argv: CERT KEY LOG BASH_COMMAND
"""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CERT, KEY, LOG, COMMAND = sys.argv[1:5]
SEEN = ("x-api-key", "authorization", "x-goog-api-key")


def events(blocks, stop):
    """The SSE stream of one assistant message made of `blocks` (text or tool_use)."""
    out = [("message_start", {"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-fake",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1}}})]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            start, delta = dict(block, text=""), {"type": "text_delta", "text": block["text"]}
        else:
            start = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        out += [("content_block_start", {"type": "content_block_start", "index": i,
                                         "content_block": start}),
                ("content_block_delta", {"type": "content_block_delta", "index": i,
                                         "delta": delta}),
                ("content_block_stop", {"type": "content_block_stop", "index": i})]
    out += [("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"})]
    return "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in out).encode()


def responses_events():
    """One assistant message as the Responses API streams it (what Codex reads)."""
    item = {"type": "message", "role": "assistant", "id": "msg_fake", "status": "completed",
            "content": [{"type": "output_text", "text": "fake-model-done", "annotations": []}]}
    usage = {"input_tokens": 1, "input_tokens_details": None, "output_tokens": 1,
             "output_tokens_details": None, "total_tokens": 2}
    out = [{"type": "response.created", "response": {"id": "resp_fake"}},
           {"type": "response.output_item.done", "output_index": 0, "item": item},
           {"type": "response.completed", "response": {"id": "resp_fake", "usage": usage}}]
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in out).encode()


def gemini_answer():
    """One text candidate as the Gemini API answers it (a JSON body, or one SSE event)."""
    return {"candidates": [{"content": {"parts": [{"text": "fake-model-done"}], "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1,
                              "totalTokenCount": 2}, "modelVersion": "gemini-fake"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, body, kind="application/json"):
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._record(b"")
        if self.headers.get("upgrade"):
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self._answer(b"{}")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._record(body)
        if self.path.startswith("/v1/responses"):
            self._answer(responses_events(), "text/event-stream")
            return
        if ":streamGenerateContent" in self.path:
            self._answer(f"data: {json.dumps(gemini_answer())}\r\n\r\n".encode(),
                         "text/event-stream")
            return
        if ":generateContent" in self.path:
            self._answer(json.dumps(gemini_answer()).encode())
            return
        if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
            self._answer(b'{"input_tokens": 1}' if "count_tokens" in self.path else b"{}")
            return
        request = json.loads(body or b"{}")
        if b"tool_result" in body:
            blocks, stop = [{"type": "text", "text": "fake-model-done"}], "end_turn"
        else:
            blocks = [{"type": "tool_use", "id": "toolu_fake1", "name": "Bash",
                       "input": {"command": COMMAND, "description": "check"}}]
            stop = "tool_use"
        if request.get("stream"):
            self._answer(events(blocks, stop), "text/event-stream")
            return
        self._answer(json.dumps({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-fake",
            "content": blocks, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}).encode())

    def _record(self, body):
        doc = {"method": self.command, "path": self.path, "host": self.headers.get("host"),
               "headers": {k: self.headers.get(k) for k in SEEN if self.headers.get(k)},
               "tool_result": _tool_results(body)}
        with open(LOG, "a") as f:
            f.write(json.dumps(doc) + "\n")


def _tool_results(body):
    """The text of every tool_result the request carries (what the Bash tool printed)."""
    try:
        messages = json.loads(body).get("messages", [])
    except (ValueError, AttributeError):
        return []
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, list):
                    inner = "".join(b.get("text", "") for b in inner if isinstance(b, dict))
                found.append(str(inner))
    return found


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT, KEY)
server = ThreadingHTTPServer(("0.0.0.0", 443), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
