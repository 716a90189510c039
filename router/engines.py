"""What differs between inference engines, in one place per engine.

vLLM, SGLang, llama.cpp's server, llama-cpp-python, TGI and Ollama all speak
the OpenAI API, but differ in how they name their load metrics, report
prompt-cache hits, word a context-length error, continue a partial answer, and
what they accept. Each :class:`Engine` below states those facts; a node's engine
comes from ``nodes[].engine`` in the config or is detected by the prober from
what the node exposes (:func:`detect`).

Everything Ballast itself adds to a request is accepted by every engine:
request ids are UUIDs (llama-cpp-python answers 400 to any other
``x-request-id``), and no other header is added besides the node's own bearer
token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Engine:
    name: str
    # How the engine reports prompt-cache hits in an answer (a dotted path).
    cache_hits: str | None
    # How it continues a partial assistant answer: "continue_final_message" (the
    # request flag), "prefill" (a trailing assistant message is continued and
    # echoed in the answer), or None (unknown or not supported).
    continuation: str | None
    tokenize_path: str | None  # its tokenizer endpoint, if any
    # Where the engine states its context length: a field of its /v1/models entries.
    context_field: str | None = None


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("vllm", "usage.prompt_tokens_details.cached_tokens", "continue_final_message",
               "/tokenize", "max_model_len"),
        Engine("sglang", "usage.prompt_tokens_details.cached_tokens", "continue_final_message",
               None, "max_model_len"),
        Engine("llamacpp", "timings.cache_n", "prefill", "/tokenize", None),
        Engine("llama-cpp-python", None, None, "/extras/tokenize", None),
        Engine("tgi", None, None, "/tokenize", None),
        Engine("ollama", None, None, None, None),
        Engine("openai", "usage.prompt_tokens_details.cached_tokens", None, None, None),
    )
}  # fmt: skip
UNKNOWN = "unknown"
NO_ENGINE = Engine(UNKNOWN, None, None, None)

# Context-length errors, as each engine words them (matched on the error message).
_CONTEXT_ERRORS = re.compile(
    r"maximum context length is \d+"  # vLLM, llama-cpp-python, OpenAI
    r"|exceeds the available context size"  # llama.cpp's server
    r"|longer than the model's context length"  # SGLang
    r"|`max_new_tokens` must be <= \d+"  # TGI
    r"|context length exceeded|context_length_exceeded",
    re.IGNORECASE,
)
_N_CTX = re.compile(r"(?:context length is|context size \(|context length \(|must be <=)\s*(\d+)")


def detect(models_doc: Any, server_header: str | None) -> str:
    """The engine behind a node, from its /v1/models answer and its Server header."""
    owner = ""
    entry: Mapping[str, Any] = {}
    if isinstance(models_doc, dict) and isinstance(models_doc.get("data"), list):
        first = models_doc["data"][0] if models_doc["data"] else {}
        if isinstance(first, dict):
            entry = first
            owner = str(first.get("owned_by", ""))
    server = (server_header or "").lower()
    if owner == "vllm":
        return "vllm"
    if owner == "sglang":
        return "sglang"
    if owner == "llamacpp" or "llama.cpp" in server:
        return "llamacpp"
    if owner == "tgi" or "text-generation" in server:
        return "tgi"
    if owner in ("library", "ollama"):
        return "ollama"
    if owner == "me" and "uvicorn" in server and "permissions" in entry:
        return "llama-cpp-python"
    return UNKNOWN


def context_length_of(engine: str, models_doc: Any, model: str) -> int | None:
    """The context length a node states for ``model`` in its /v1/models, if it does."""
    e = ENGINES.get(engine)
    if e is None or e.context_field is None or not isinstance(models_doc, dict):
        return None
    for entry in models_doc.get("data") or ():
        if isinstance(entry, dict) and entry.get("id") == model:
            value = entry.get(e.context_field)
            if isinstance(value, int) and 0 < value < 1 << 24:
                return value
    return None


def context_error(status: int, body: bytes) -> int | None:
    """For a 400/413/422 that says the request is too long for the node's context:
    the context length it states (0 when unstated). None: not a context error."""
    if status not in (400, 413, 422) or len(body) > 65536:
        return None
    text = body.decode("utf-8", "replace")
    if not _CONTEXT_ERRORS.search(text):
        return None
    found = _N_CTX.search(text)
    return int(found.group(1)) if found else 0
