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

from router.bill import LIMIT_FIELDS, UNLIMITED_EVENTS, text_bytes

DONE = b"data: [DONE]"
SSE_FIELDS = (b":", b"event:", b"id:", b"retry:")
MAX_EVENT_BYTES = 64 * 1024  # one event at most (limits.max_event_bytes)


def _data(event: bytes) -> bytes | None:
    """An SSE event's data: its ``data:`` lines joined (the space after the colon is
    optional), whatever other fields (``id:``, ``event:``, comments) it has, as every
    SSE client reads it; None for an event without data."""
    if event.startswith(b"data:") and b"\n" not in event:  # the usual event: one line
        return event[6:] if event[5:6] == b" " else event[5:]
    lines = [
        line[6:] if line[5:6] == b" " else line[5:]
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


class Relay:
    __slots__ = (
        "base",
        "buf",
        "chat",
        "continued",
        "cut",
        "delivered",
        "done",
        "failure",
        "finish",
        "hide_usage",
        "ident",
        "limit",
        "max_event",
        "resumable",
        "role_sent",
        "started",
        "strip",
        "text",
        "usage",
        "volume",
    )

    def __init__(
        self,
        chat: bool,
        hide_usage: bool = False,
        limit: int | None = None,
        cut: int = UNLIMITED_EVENTS,
        max_event: int = MAX_EVENT_BYTES,
    ) -> None:
        self.chat = chat
        self.limit = limit  # the request's completion tokens (router.bill); None: unlimited
        self.cut = cut  # more content events than this: the stream is cut (Sizes.events)
        self.max_event = max_event
        # The node was asked for usage the client did not ask for: the usage-only
        # chunk is read (``usage``) and left out.
        self.hide_usage = hide_usage
        self.usage: dict[str, Any] | None = None
        self.buf = bytearray()  # the event begun and not yet ended
        self.ident: dict[str, Any] = {}  # id, created, model, system_fingerprint of the answer
        self.text: list[str] = []  # the answer's text so far, in pieces
        # Content events sent to the client: tokens, on engines that stream one each.
        self.delivered = 0
        self.volume = 0  # UTF-8 bytes of generated text delivered (router.bill)
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
        """Whole events (each without its blank line) from the next bytes of a stream.

        Linear in the bytes: only new bytes are searched for an event's end, and an
        event begun is kept in a growing buffer, not copied again with every chunk.
        An event longer than ``max_event`` bytes is garbage (``failure``)."""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buf = self.buf
        events: list[bytes] = []
        if buf:
            if buf[-1] == 10 and data[:1] == b"\n":  # the blank line spans two chunks
                end = 0
                events.append(bytes(buf[:-1]))
            else:
                end = data.find(b"\n\n")
                if end < 0:
                    buf += data
                    if len(buf) > self.max_event:
                        self._overlong()
                    return events
                buf += data[:end]
                events.append(bytes(buf))
                end += 1
            buf.clear()
            data = data[end + 1 :]
        more = data.split(b"\n\n")
        rest = more.pop()
        if rest:
            buf += rest
        events += more
        max_event = self.max_event
        if len(buf) > max_event or (events and max(map(len, events)) > max_event):
            self._overlong()
            return []
        return events

    def _overlong(self) -> None:
        self.failure = "garbage"
        self.buf.clear()

    def track(self, event: bytes) -> bytes | None:
        """Read one event of the first answer: what goes to the client (the event as
        it came; None: the usage chunk the client did not ask for, or a failure)."""
        body = _data(event)
        if body is None:
            self._other(event)
            return event
        if body == b"[DONE]":
            self.done = True
            return event
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.failure = "garbage"
            return None
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
                    self.volume += len(piece.encode())
                    return event
            except (KeyError, TypeError, ValueError):
                pass
        if not self._answer_event(doc):
            return None
        if not self.started:
            self.started = True
            self.ident = {k: doc[k] for k in ("id", "created", "model", "system_fingerprint")
                          if k in doc}  # fmt: skip
        self._read(doc)
        return None if self.hide_usage and self._usage_only(doc) else event

    def _answer_event(self, doc: Any) -> bool:
        """Whether a data event's JSON is a chunk of an answer (else ``failure``)."""
        if not isinstance(doc, dict):
            self.failure = "garbage"
            return False
        if "error" in doc:
            self.failure = "error_event"
            return False
        return True

    def _usage_only(self, doc: dict[str, Any]) -> bool:
        return isinstance(doc.get("usage"), dict) and not doc.get("choices")

    def _other(self, event: bytes) -> None:
        """An event without data passes when it holds SSE fields only (comments,
        ``id:``, ``event:``, ``retry:``); anything else is garbage."""
        if not all(line.startswith(SSE_FIELDS) for line in event.lstrip().split(b"\n") if line):
            self.failure = "garbage"

    def _read(self, doc: dict[str, Any]) -> None:
        """Note one chunk: its usage, and per choice its generated text (every choice
        with any counts as one more event towards the request's tokens: content,
        reasoning and tool calls alike), its finish, and what rules a continuation out."""
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
                generated = text_bytes(delta)
                if generated:
                    self.volume += generated
                    self.delivered += 1
                piece = delta.get("content" if self.chat else "text")
                if isinstance(piece, str) and piece:
                    self.text.append(piece)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    # -- continuing ---------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        """Whether every token the request asked for has already been delivered."""
        return self.limit is not None and self.delivered >= self.limit

    def continuation(self, request: dict[str, Any], style: str) -> dict[str, Any]:
        """The request asking another node for the rest (when not :meth:`exhausted`)."""
        text = "".join(self.text)
        cont = dict(request)
        if self.limit is not None:
            left = max(1, self.limit - self.delivered)
            for name in LIMIT_FIELDS:
                if name in request:
                    cont[name] = left
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
        self.buf.clear()  # what the failed node left half-sent is not the new node's
        self.failure = None

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as part of the first answer; None: drop it."""
        body = _data(event)
        if body is None:
            self._other(event)
            return None
        if body == b"[DONE]":
            self.done = True
            return DONE
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.failure = "garbage"
            return None
        if not self._answer_event(doc):
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
