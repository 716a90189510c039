"""What a request may cost, and what a node may bill for it.

Two parties make claims that end on a key's bill, and neither is believed:

* **The client** sizes its request with ``max_tokens`` / ``max_completion_tokens``
  and ``n``; engines coerce these as pydantic does (``5.0`` and ``"5"`` are 5, a
  ``"stream": "true"`` streams). :func:`read_sizes` coerces them the same way, so
  what Ballast estimates, reserves and cuts at is what the engine will generate,
  and refuses (400) what an engine would refuse. A coerced body is sent on
  rewritten, so the node receives the value the bill was sized by.
* **The node** reports ``usage``. :func:`bounded` bills the smaller of its claim
  and what Ballast can measure: completion tokens at most ``limit * n`` (the
  request's own limit, when it set one) and at most what was delivered (content
  events, or the bytes of generated text: byte-level tokenizers never make more
  tokens than bytes, plus one stop token and a few template tokens per choice);
  prompt tokens at most the request body's bytes plus a chat template's slack and
  a fixed allowance per image or audio part. A claim over a bound is billed at the
  bound and flags the node (``bad_usage``): it is counted, visible in the
  attempts metric, and a failure on its scoreboard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_COMPLETION_TOKENS = 256  # a request's completion estimate when it sets no limit
PROMPT_BYTES_PER_TOKEN = 4  # the prompt's estimate: its body's bytes over this
PROMPT_SLACK = 512  # tokens a chat template may add beyond the body's bytes
MEDIA_TOKENS = 16_384  # tokens one image, audio or video part may add to a prompt
MEDIA_PARTS = frozenset({"image_url", "input_audio", "video_url", "audio_url", "image", "file"})
# Every field an engine reads as the completion's length (llama.cpp's server reads
# n_predict before max_tokens; TGI max_new_tokens): the largest is the limit.
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict", "max_new_tokens")
STOP_SLACK = 16  # tokens per choice a node may count without text (stop, template tokens)
MAX_TOKENS_LIMIT = 1 << 31  # a larger max_tokens is refused, as engines refuse it
MAX_N = 128  # choices per request (OpenAI's limit)
# A stream without a limit of its own is cut after this many content events per
# choice: longer than any context an engine serves, short of a node that never ends.
UNLIMITED_EVENTS = 1 << 18
_INT = re.compile(r"\s*[+-]?\d{1,12}\s*")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(slots=True)
class Sizes:
    """A request's generation size, as its engine will read it."""

    stream: bool
    limit: int | None  # the largest of LIMIT_FIELDS; None: no limit set
    n: int  # choices asked for
    changed: bool  # the body must be sent rewritten (a value was coerced)
    media: int = 0  # image, audio and video parts of the messages (counted when billed)
    generates: bool = True  # False: an embeddings request (no completion at all)

    @property
    def completion_estimate(self) -> int:
        if not self.generates:
            return 0
        return (self.limit or DEFAULT_COMPLETION_TOKENS) * self.n

    @property
    def events(self) -> int:
        """Content events after which a stream is cut (finish_reason: length)."""
        return (self.limit or UNLIMITED_EVENTS) * self.n


class Invalid(ValueError):
    """A field the engines would refuse: (message, param)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as pydantic's lax mode reads an int (an int, an integral float, a
    string of digits), within [low, high]; Invalid otherwise."""
    if type(value) is int:
        n = value
    elif type(value) is float and value.is_integer():
        n = int(value)
    elif type(value) is str and _INT.fullmatch(value):
        n = int(value)
    else:
        raise Invalid(f"{name} must be an integer", name)
    if not low <= n <= high:
        raise Invalid(f"{name} must be between {low} and {high}", name)
    return n


def _as_bool(value: Any, name: str) -> bool:
    """``value`` as pydantic's lax mode reads a bool; Invalid otherwise."""
    if type(value) is bool:
        return value
    if type(value) is int or (type(value) is float and value.is_integer()):
        if value in (0, 1):
            return bool(value)
    elif type(value) is str:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise Invalid(f"{name} must be a boolean", name)


def read_sizes(doc: dict[str, Any], generates: bool = True) -> Sizes:
    """The request's stream flag, token limit and choices, coerced in ``doc`` (in
    place) where they were not already plain values; Invalid for what engines refuse.
    ``generates`` False (embeddings): no completion, so no limit or choices."""
    changed = False
    stream = doc.get("stream")
    if stream is not None and type(stream) is not bool:
        doc["stream"] = stream = _as_bool(stream, "stream")
        changed = True
    options = doc.get("stream_options")
    if options is not None:
        if type(options) is not dict:
            raise Invalid("stream_options must be an object", "stream_options")
        usage = options.get("include_usage")
        if usage is not None and type(usage) is not bool:
            doc["stream_options"] = {**options, "include_usage": _as_bool(usage, "include_usage")}
            changed = True
    if not generates:
        return Sizes(stream is True, None, 1, changed, 0, generates=False)
    limit = None
    for name in LIMIT_FIELDS:
        value, coerced = _int_field(doc, name, MAX_TOKENS_LIMIT)
        changed = changed or coerced
        if value is not None and (limit is None or value > limit):
            limit = value
    n, coerced = _int_field(doc, "n", MAX_N)
    changed = changed or coerced
    return Sizes(stream is True, limit, n or 1, changed)


def media_parts(messages: Any) -> int:
    """Image, audio and video parts of chat messages (counted by their structure,
    not by their names appearing anywhere in the body)."""
    if type(messages) is not list:
        return 0
    n = 0
    for message in messages:
        content = message.get("content") if type(message) is dict else None
        if type(content) is list:
            n += sum(
                1 for part in content if type(part) is dict and part.get("type") in MEDIA_PARTS
            )
    return n


def limit_to(doc: dict[str, Any], sizes: Sizes, limit: int) -> None:
    """Lower the request's completion limit to ``limit`` tokens per choice, in
    ``doc`` (every length field it has, else ``max_tokens``) and ``sizes``."""
    named = [name for name in LIMIT_FIELDS if name in doc] or ["max_tokens"]
    for name in named:
        doc[name] = limit
    sizes.limit, sizes.changed = limit, True


def _int_field(doc: dict[str, Any], name: str, high: int) -> tuple[int | None, bool]:
    """``doc[name]`` as an int in [1, high] (None when absent), and whether it had to
    be coerced (it is then written back)."""
    value = doc.get(name)
    if value is None:
        return None, False
    coerced = _as_int(value, name, 1, high)
    if type(value) is int:
        return coerced, False
    doc[name] = coerced
    return coerced, True


def prompt_bound(body: bytes, media: int = 0) -> int:
    """The most prompt tokens a request body (with ``media`` parts) can make."""
    return len(body) + PROMPT_SLACK + media * MEDIA_TOKENS


def generated_bytes(doc: dict[str, Any]) -> int:
    """UTF-8 bytes of the text an answer (read whole) generated: every choice's
    content, reasoning and tool calls."""
    total = 0
    choices = doc.get("choices")
    if type(choices) is not list:
        return 0
    for choice in choices:
        if type(choice) is not dict:
            continue
        message = choice.get("message")
        part = message if type(message) is dict else choice  # chat, or completions' text
        total += text_bytes(part)
    return total


def text_bytes(part: dict[str, Any]) -> int:
    """UTF-8 bytes of the generated text in one message or delta."""
    total = 0
    for field in ("content", "text", "reasoning_content", "reasoning", "refusal"):
        value = part.get(field)
        if type(value) is str:
            total += len(value.encode())
    calls = part.get("tool_calls")
    if type(calls) is list:
        for call in calls:
            fn = call.get("function") if type(call) is dict else None
            if type(fn) is dict:
                for field in ("name", "arguments"):
                    value = fn.get(field)
                    if type(value) is str:
                        total += len(value.encode())
    return total


def bounded(
    claimed: tuple[int, int] | None,
    prompt_max: int,
    prompt_estimate: int,
    measured: int,
    completion_max: int,
) -> tuple[tuple[int, int], bool]:
    """The tokens to bill, and whether the node's claim exceeded a bound.

    ``claimed``: the node's (prompt, completion), if it gave a valid usage; without
    one, the prompt's estimate and the completion Ballast ``measured``."""
    if claimed is None:
        return (min(prompt_estimate, prompt_max), min(measured, completion_max)), False
    prompt, completion = claimed
    if prompt <= prompt_max and completion <= completion_max:
        return claimed, False
    return (min(prompt, prompt_max), min(completion, completion_max)), True


def bill(
    sizes: Sizes, body: bytes, claimed: tuple[int, int] | None, events: int | None, volume: int
) -> tuple[tuple[int, int], bool]:
    """The (prompt, completion) tokens to bill for an answer to ``body``, and whether
    the node's ``claimed`` usage exceeded what it could have used.

    ``events``: content events streamed (None: an answer read whole, whose
    completion without a claim is estimated from its text); ``volume``: UTF-8 bytes
    of generated text delivered."""
    n = sizes.n
    most = max(events or 0, volume) + STOP_SLACK * n
    if sizes.limit is not None and sizes.limit * n < most:
        most = sizes.limit * n
    measured = events if events is not None else -(-volume // PROMPT_BYTES_PER_TOKEN)
    estimate = len(body) // PROMPT_BYTES_PER_TOKEN
    return bounded(claimed, prompt_bound(body, sizes.media), estimate, measured, most)
