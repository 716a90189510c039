"""Relaying a stream event by event, and continuing it on another node.

:class:`Relay` sits between a node's SSE stream and the client. It splits the
bytes into whole events (a chunk that ends mid-event is held until the rest
arrives: the client never sees half an event) and reads each ``data:`` event
for just what a continuation needs: the answer's ``id``, ``created``, ``model``
and ``system_fingerprint``, the text so far (``choices[0].delta.content`` or
``choices[0].text``), tokens delivered, ``finish_reason``, ``usage``, and
whether the answer can be continued honestly at all (one choice, no tool-call
deltas, no logprobs).

When the node fails after bytes went out (reset, read error, silence for
``timeouts.stream_idle_s``, an error event, or an end without a finish reason
or ``[DONE]``), :meth:`Relay.continuation` builds the request that asks another
node for the rest: the original messages plus a final assistant message
holding the text so far (``continue_final_message`` for vLLM and SGLang; a
trailing assistant message is a prefill for llama.cpp's server, which echoes
it), or the prompt followed by the text so far for ``/v1/completions``, with
``max_tokens`` reduced by the tokens already delivered. The continuation's
events are then rewritten (:meth:`Relay.rewrite`) so the client sees one
answer: the first answer's ids, one role delta, no echoed prefill, and one
usage chunk counting the original prompt and every completion token.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]"
SSE_FIELDS = (b":", b"event:", b"id:", b"retry:")


class Relay:
    __slots__ = (
        "base",
        "buf",
        "chat",
        "continued",
        "delivered",
        "done",
        "failure",
        "finish",
        "hidden",
        "hide_usage",
        "ident",
        "resumable",
        "role_sent",
        "started",
        "strip",
        "text",
        "usage",
    )

    def __init__(self, chat: bool, hide_usage: bool = False) -> None:
        self.chat = chat
        # The node was asked for usage the client did not ask for: the usage-only
        # chunk is read (``usage``) and left out (``hidden``: the event to drop).
        self.hide_usage = hide_usage
        self.usage: dict[str, Any] | None = None
        self.hidden: bytes | None = None
        self.buf = b""
        self.ident: dict[str, Any] = {}  # id, created, model, system_fingerprint of the answer
        self.text: list[str] = []  # the answer's text so far, in pieces
        # Content events sent to the client: tokens, on engines that stream one each.
        self.delivered = 0
        self.finish: str | None = None
        self.done = False  # [DONE] passed
        # Why the node's stream went bad: "error_event" (it sent an error event) or
        # "garbage" (something that is not an SSE event of an answer); None: it did not.
        self.failure: str | None = None
        self.resumable = True
        self.role_sent = False
        self.started = False  # the answer's first event has been read
        self.continued = 0  # continuations so far
        self.strip = ""  # echoed prefill still to drop from a continuation's text
        self.base = 0  # tokens delivered before the current continuation

    @property
    def complete(self) -> bool:
        """The answer ended properly (a finish reason, or [DONE])."""
        return self.done or self.finish is not None

    def feed(self, data: bytes) -> list[bytes]:
        """Whole events (each without its blank line) from the next bytes of a stream."""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buf = self.buf + data if self.buf else data
        events = buf.split(b"\n\n")
        self.buf = events.pop()
        return events

    def track(self, event: bytes) -> None:
        """Read one event of the first answer (passed through unchanged)."""
        if not event.startswith(b"data: {"):
            self._other(event)
            return
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            self.failure = "garbage"
            return
        if self.started:
            # The usual event: one choice, one piece of text, nothing else to note.
            try:
                (choice,) = doc["choices"]
                delta = choice["delta"] if self.chat else choice
                piece = delta["content" if self.chat else "text"]
                if (
                    piece
                    and choice["finish_reason"] is None
                    and not choice.get("index")
                    and not choice.get("logprobs")
                    and (len(delta) == 1 or not self.chat)
                    and "usage" not in doc
                ):
                    self.text.append(piece)
                    self.delivered += 1
                    return
            except (KeyError, TypeError, ValueError):
                pass
        if not isinstance(doc, dict):
            return
        if "error" in doc:
            self.failure = "error_event"
            return
        if not self.started:
            self.started = True
            self.ident = {k: doc[k] for k in ("id", "created", "model", "system_fingerprint")
                          if k in doc}  # fmt: skip
        self._read(doc)
        if self.hide_usage and self._usage_only(doc):
            self.hidden = event

    def _usage_only(self, doc: dict[str, Any]) -> bool:
        return isinstance(doc.get("usage"), dict) and not doc.get("choices")

    def _other(self, event: bytes) -> None:
        """An event that is not a JSON chunk: [DONE], a comment or another SSE field
        pass; anything else is garbage."""
        if event.startswith(DONE):
            self.done = True
        elif not event.lstrip().startswith(SSE_FIELDS):
            self.failure = "garbage"

    def _read(self, doc: dict[str, Any]) -> None:
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = doc.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0 or choice.get("logprobs"):
                self.resumable = False
            delta = choice.get("delta") if self.chat else choice
            if isinstance(delta, dict):
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.resumable = False
                if delta.get("role"):
                    self.role_sent = True
                piece = delta.get("content" if self.chat else "text")
                if isinstance(piece, str) and piece:
                    self.text.append(piece)
                    self.delivered += 1
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    # -- continuing ---------------------------------------------------------------

    def exhausted(self, request: dict[str, Any]) -> bool:
        """Whether every token the request asked for has already been delivered."""
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        return isinstance(limit, int) and self.delivered >= limit

    def continuation(self, request: dict[str, Any], style: str) -> dict[str, Any]:
        """The request asking another node for the rest (when not :meth:`exhausted`)."""
        text = "".join(self.text)
        cont = dict(request)
        limit_key = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
        limit = request.get(limit_key)
        if isinstance(limit, int):
            cont[limit_key] = max(1, limit - self.delivered)
        if self.chat:
            messages = list(request.get("messages") or [])
            messages.append({"role": "assistant", "content": text})
            cont["messages"] = messages
            if style == "continue_final_message":
                cont["continue_final_message"] = True
                cont["add_generation_prompt"] = False
        else:
            cont["prompt"] = str(request.get("prompt", "")) + text
        cont["stream"] = True
        return cont

    def continued_by(self, style: str) -> None:
        """A continuation asked for by :meth:`continuation` has started."""
        self.strip = "".join(self.text) if style == "prefill" else ""
        self.base = self.delivered
        self.continued += 1
        self.buf = b""  # what the failed node left half-sent is not the new node's
        self.failure = None

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as part of the first answer; None: drop it."""
        if not event.startswith(b"data: {"):
            self._other(event)
            return event if event.startswith(DONE) else None
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            self.failure = "garbage"
            return None
        if not isinstance(doc, dict):
            return None
        if "error" in doc:
            self.failure = "error_event"
            return None
        usage = doc.get("usage")
        if isinstance(usage, dict):
            doc["usage"] = self._usage(usage)
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if self.chat else choice
            if not isinstance(delta, dict):
                continue
            if self.chat and "role" in delta and self.role_sent:
                del delta["role"]
            key = "content" if self.chat else "text"
            piece = delta.get(key)
            if isinstance(piece, str) and self.strip:
                piece = self._unecho(piece)
                delta[key] = piece
        doc.update(self.ident)
        self._read(doc)
        if self.hide_usage and self._usage_only(doc):
            return None
        return b"data: " + orjson.dumps(doc)

    def _unecho(self, piece: str) -> str:
        """Drop the part of ``piece`` that repeats the prefill the node echoed."""
        strip = self.strip
        if strip.startswith(piece):
            self.strip = strip[len(piece) :]
            return ""
        if piece.startswith(strip):
            self.strip = ""
            return piece[len(strip) :]
        self.strip = ""  # the node did not echo it after all
        return piece

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The continuation's usage as the whole answer's: the original prompt (the
        continuation's, less the tokens it was given back), and the completion tokens
        of every node."""
        out = dict(usage)
        completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        if isinstance(completion, int) and isinstance(prompt, int):
            out["completion_tokens"] = completion + self.base
            out["prompt_tokens"] = max(0, prompt - self.base)
            out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
        return out

    def final_event(self, finish: str) -> bytes:
        """A last chunk ending the answer with ``finish`` (when nothing is left to ask for)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        choice["delta" if self.chat else "text"] = {} if self.chat else ""
        doc = {**self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "choices": [choice]}  # fmt: skip
        self.finish = finish
        return b"data: " + orjson.dumps(doc)
