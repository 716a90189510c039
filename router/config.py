"""Configuration: one YAML file, validated once at load time.

The file is parsed into pydantic models (unknown keys are errors), then
environment overrides are applied (secrets and URLs only). Everything the
request path needs is resolved here, so the proxy never parses or looks up
configuration per request.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Loc = tuple[Any, ...]  # a key path: ("nodes", 0, "labels") is nodes[0].labels


def key_path(loc: Loc) -> str:
    """``nodes[0].labels`` for ``("nodes", 0, "labels")``; ``<root>`` for ``()``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config: where (key path, and YAML line when known), why."""

    loc: Loc
    message: str
    line: int | None = None

    def __str__(self) -> str:
        at = f" (line {self.line})" if self.line is not None else ""
        return f"{key_path(self.loc)}: {self.message}{at}"


class ConfigError(Exception):
    """A configuration problem, with the key path that caused it. ``problems`` holds
    every one found in the file (empty when it could not be read or parsed at all)."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def of(cls, problems: Iterable[Problem]) -> ConfigError:
        found = list(problems)
        return cls("\n".join(map(str, found)), found)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean X?`` for the choice closest to ``word``, else `` (known: ...)``."""
    known = sorted(choices)
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return f"; did you mean {close[0]}?"
    return f" (known: {', '.join(known)})" if known else ""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class PolicyConfig(_Strict):
    name: str = "score"
    params: dict[str, Any] = Field(default_factory=dict)


def unprintable(value: str) -> str | None:
    """Why a name or text from outside (a node's claims, a key's fields, the config)
    may not be kept, or None: it holds a character ``str.isprintable`` refuses, one
    of the controls, format characters (bidi embeddings, overrides and isolates,
    zero-width characters, U+FEFF), line and paragraph separators, spaces other than
    U+0020, surrogates, private-use and unassigned code points. They would reach
    operators' terminals and logs, or make one name look like another."""
    if value.isprintable():
        return None
    bad = next(c for c in value if not c.isprintable())
    return f"U+{ord(bad):04X}: no control, invisible or bidi characters"


def printable(value: str) -> str:
    """``value`` if it may be kept (see ``unprintable``); a validator."""
    if (why := unprintable(value)) is not None:
        raise ValueError(why)
    return value


ROUTER_ID = "ballast"  # the x-ballast-node of the router's own answers


def not_the_router(value: str) -> str:
    """A node id that cannot pass for the router's own answers (any case)."""
    if value.lower() == ROUTER_ID:
        raise ValueError(f"{ROUTER_ID!r} is reserved for the router's own answers")
    return value


NodeId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$"),
    AfterValidator(not_the_router),
]
# Names and free text a node supplies: bounded and printable (see ``printable``).
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(printable)]
Text = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(printable)]
LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,62}")  # the whole key (fullmatch)


def label_key(value: str) -> str:
    """A label name as the config or a node may give it (``LABEL_KEY``, whole)."""
    if not LABEL_KEY.fullmatch(value):
        raise ValueError(f"label key {value[:64]!r} must match {LABEL_KEY.pattern}")
    return value


LabelKey = Annotated[str, AfterValidator(label_key)]
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
# Labels Ballast reads as numbers, with their bounds (inclusive).
NUMERIC_LABELS: dict[str, tuple[float, float]] = {
    "context_length": (1, 100_000_000),
    "price_per_mtok": (0, 1_000_000),
    "price_per_hour": (0, 1_000_000),
    "max_concurrency": (1, 100_000),  # requests the node serves at once (router.gate)
}


def label_number(labels: dict[str, str], key: str) -> float | None:
    """A numeric label's value within its bounds, or None (absent or invalid)."""
    raw = labels.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    lo, hi = NUMERIC_LABELS[key]
    return value if lo <= value <= hi else None


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as a node or the config may give them: bounded keys and values, and
    the labels Ballast reads as numbers valid numbers within their bounds."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        label_key(key)
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key}: at most {MAX_LABEL_VALUE} characters")
        if (why := unprintable(value)) is not None:
            raise ValueError(f"label {key}: {why}")
        if key in NUMERIC_LABELS and label_number(labels, key) is None:
            lo, hi = NUMERIC_LABELS[key]
            raise ValueError(f"label {key}: must be a number from {lo:g} to {hi:g}")
    return labels


def numbers_as_text(labels: Any) -> Any:
    """Labels as YAML or JSON give them: a number (not a boolean) in a label Ballast
    reads as a number (``NUMERIC_LABELS``: ``price_per_mtok: 0.2``) is taken as its
    text. Every other label value must be a string: ``zone: 01`` would be ``1``."""
    if not isinstance(labels, dict):
        return labels
    return {
        k: str(v) if k in NUMERIC_LABELS and isinstance(v, int | float) and not isinstance(v, bool)
        else v
        for k, v in labels.items()
    }  # fmt: skip


# A node's labels, in the config or a registration (see check_labels, numbers_as_text).
Labels = Annotated[dict[str, str], BeforeValidator(numbers_as_text), AfterValidator(check_labels)]


def engine_name(v: str) -> str:
    """An engine Ballast knows (router.engines), as a node or the config names it."""
    from router.engines import ENGINES

    if v not in ENGINES:
        raise ValueError(f"unknown engine {v[:64]!r} (known: {', '.join(sorted(ENGINES))})")
    return v


EngineName = Annotated[str, AfterValidator(engine_name)]

ENV_UNSET = "env_unset"  # the error type of a *_env field naming an unset variable


def _env_var(empty_ok: bool) -> AfterValidator:
    """A ``*_env`` field: the variable it names must be set (and, unless ``empty_ok``,
    not empty) in the environment the config is checked against (the ``env`` of the
    validation context, which ``parse_config`` passes; without one, not checked)."""

    def check(name: str, info: ValidationInfo) -> str:
        env = (info.context or {}).get("env")
        if env is not None and name and (name not in env if empty_ok else not env.get(name)):
            raise PydanticCustomError(
                ENV_UNSET, "environment variable {name} is not set", {"name": name}
            )
        return name

    return AfterValidator(check)


EnvVar = Annotated[str, _env_var(empty_ok=False)]
EnvVarOrEmpty = Annotated[str, _env_var(empty_ok=True)]  # a node's API key may be empty


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a node's base URL, or None (its address is checked apart)."""
    if " " in url or not url.isprintable():  # urlsplit drops tabs and newlines silently
        return "must not contain whitespace or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "must not carry credentials, a query string or a fragment"
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "has an invalid port"
    return None


class NodeConfig(_Strict):
    id: NodeId
    url: str
    models: list[ModelName] = Field(min_length=1)
    gpu: Text | None = None
    vram_gb: float | None = Field(None, ge=0, le=1_000_000)
    gpus: int = Field(1, ge=0, le=1024)
    api_key_env: EnvVarOrEmpty | None = None
    labels: Labels = Field(default_factory=dict)
    engine: EngineName | None = None  # vllm, sglang, llamacpp, llama-cpp-python, tgi, ...

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if (problem := url_problem(v)) is not None:
            raise ValueError(problem)
        return v.rstrip("/")


class Timeouts(_Strict):
    connect_s: float = Field(2.0, gt=0)
    first_byte_s: float = Field(30.0, gt=0)
    total_s: float = Field(600.0, gt=0)
    stream_idle_s: float = Field(60.0, gt=0)


class Retries(_Strict):
    max_attempts: int = Field(3, ge=1, le=10)
    budget_percent: float = Field(20.0, ge=0, le=100)
    min_retry_concurrency: int = Field(3, ge=0)
    budget_wait_s: float = Field(1.0, ge=0, le=60)


class Limits(_Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # One answer read whole (every non-streamed answer) may be at most this large, and
    # all the answers this process holds whole at once may take at most buffered_bytes
    # of memory (six times their size: chunks, body, parsed answer, socket buffer):
    # over either, the attempt fails (the node is not blamed for the router's budget).
    max_response_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    buffered_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # One SSE event of a stream may be at most this large; a longer one is garbage.
    max_event_bytes: int = Field(64 * 1024, ge=1024)
    # A client's request body must arrive within this time (else 408).
    body_timeout_s: float = Field(60.0, gt=0)
    # A connection with no complete request header this long after it opened, or
    # after its last answer (an idle keep-alive), is closed.
    idle_timeout_s: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)  # one header line


class Scoring(_Strict):
    decay_s: float = Field(10.0, gt=0)
    success_half_life_s: float = Field(30.0, gt=0)
    failure_penalty_s: float = Field(5.0, ge=0)
    default_latency_s: float = Field(1.0, gt=0)
    # Latency differences below this are noise (loopback jitter, a first connection):
    # it is added to every estimate before nodes are compared.
    latency_floor_s: float = Field(0.02, ge=0)


class SentinelConfig(_Strict):
    hosts: list[str] = Field(min_length=1)  # "host:port"
    service: str = "mymaster"


class StateConfig(_Strict):
    """``redis_url`` or ``sentinel`` set: state is shared through Redis."""

    redis_url: str | None = None
    key_prefix: str = Field("ballast:", min_length=1, max_length=64)
    cluster: bool = False
    sentinel: SentinelConfig | None = None
    sync_interval_s: float = Field(0.5, gt=0, le=60)
    flush_interval_s: float = Field(0.25, gt=0, le=60)
    timeout_s: float = Field(1.0, gt=0, le=30)
    # Without Redis: the file (SQLite) where the embedded store keeps client keys,
    # revocations and usage across restarts; None: kept in memory only.
    path: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v


class JoinConfig(_Strict):
    """Self-registration of nodes (the ``registry`` section)."""

    join_token_env: EnvVar | None = None
    heartbeat_ttl_s: float = Field(30.0, gt=0)
    allowed_networks: list[str] = Field(default_factory=list)
    max_nodes: int = Field(10_000, ge=1)  # self-registered nodes, over all join-token holders
    max_models_per_node: int = Field(16, ge=1, le=256)
    allowed_models: list[ModelName] = Field(default_factory=list)  # empty: any model
    gone_retention_s: float = Field(3600.0, ge=0)  # a gone node is forgotten after this

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR network") from None
        return v


class LoggingConfig(_Strict):
    level: str = Field("info", pattern=r"^(debug|info|warning|error)$")
    format: str = Field("json", pattern=r"^(json|text)$")
    access_log: bool = True


class HealthConfig(_Strict):
    probe: bool = True
    verify_static: bool = True
    probe_interval_s: float = Field(5.0, gt=0)
    verified_probe_interval_s: float = Field(30.0, gt=0)
    probe_timeout_s: float = Field(10.0, gt=0)
    probe_concurrency: int = Field(16, ge=1)
    probe_failures_to_unverify: int = Field(2, ge=1)
    consecutive_failures: int = Field(5, ge=1)
    consecutive_timeouts: int = Field(1, ge=1)
    success_rate_min_requests: float = Field(20.0, gt=0)
    success_rate_stdev_factor: float = Field(1.9, gt=0)
    success_rate_min_nodes: int = Field(3, ge=2)
    failure_ratio_threshold: float = Field(0.5, gt=0, le=1)
    base_ejection_s: float = Field(30.0, gt=0)
    max_ejection_s: float = Field(300.0, gt=0)
    max_ejection_percent: float = Field(50.0, ge=0, le=100)
    slow_start_s: float = Field(30.0, ge=0)
    check_interval_s: float = Field(0.1, gt=0)
    scrape_engine_metrics: bool = False
    engine_metrics_interval_s: float = Field(5.0, gt=0)
    # Model substitution (router.challenges): compare greedy probe answers across nodes.
    challenges: bool = True
    challenge_min_nodes: int = Field(3, ge=2)
    challenge_words: int = Field(6, ge=1, le=32)
    challenge_strikes: int = Field(2, ge=1)


class ModelConfig(_Strict):
    kv_bytes_per_token: int | None = Field(None, gt=0)
    context_length: int | None = Field(None, gt=0)
    weights_gb: float = Field(0.0, ge=0)
    hedge_after_ms: float | None = Field(None, gt=0)
    # Models that serve this model's requests when none of its nodes can (router.pools).
    fallbacks: list[ModelName] = Field(default_factory=list, max_length=8)
    # Other names of this model (router.fleet): a node claiming one serves this model
    # under it, and a request may ask for any of them.
    aliases: list[ModelName] = Field(default_factory=list, max_length=64)


class HedgeConfig(_Strict):
    after_ms: float | None = Field(None, gt=0)
    use_p95_ttfb: bool = True
    p95_min_ms: float = Field(50.0, gt=0)
    p95_max_ms: float = Field(2000.0, gt=0)
    budget_percent: float = Field(5.0, ge=0, le=100)

    @model_validator(mode="after")
    def _bounds(self) -> HedgeConfig:
        if self.p95_min_ms > self.p95_max_ms:
            raise ValueError("p95_min_ms must not exceed p95_max_ms")
        return self


class ResumeConfig(_Strict):
    enabled: bool = True
    max_continuations: int = Field(2, ge=0, le=10)
    straggler_factor: float = Field(3.0, ge=0)
    # A stream this many times slower than the median pace of the model's nodes is a
    # timeout failure of its node, continued elsewhere; 0: never.
    slow_factor: float = Field(8.0, ge=0)


class AffinityConfig(_Strict):
    """Cache-aware routing (router.affinity), with the policies that use it (score)."""

    enabled: bool = True
    epsilon: float = Field(0.25, ge=0, le=10)


class QueueConfig(_Strict):
    max_size: int = Field(1000, ge=0)
    max_wait_s: float = Field(10.0, ge=0)


class MetricsConfig(_Strict):
    enabled: bool = True
    token_env: EnvVar | None = None  # set: scrapes need Authorization: Bearer <token>
    max_models: int = Field(100, ge=1, le=10_000)  # model label values; the rest are "other"
    max_nodes: int = Field(1000, ge=0, le=100_000)  # nodes with per-node series
    max_keys: int = Field(100, ge=0, le=100_000)  # client key names as labels; then "other"


KeyName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
PoolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class KeyLimits(_Strict):
    """What one client key may do (static keys in the config; dynamic ones through
    the admin API take the same fields)."""

    models: list[ModelName] = Field(default_factory=list)  # empty: every model
    rpm: int | None = Field(None, ge=1, le=10_000_000)  # requests per minute
    tpm: int | None = Field(None, ge=1, le=10_000_000_000)  # tokens per minute
    max_parallel: int | None = Field(None, ge=1, le=1_000_000)
    priority: str = Field("interactive", pattern=r"^(interactive|batch)$")
    expires_at: float | None = Field(None, ge=0)  # Unix time
    # Tokens (prompt + completion) per UTC day or month, over all replicas.
    budget_tokens: int | None = Field(None, ge=1, le=10**15)
    budget_period: str = Field("day", pattern=r"^(day|month)$")
    # The pools this key's requests may use, in order (router.pools); empty: all.
    pools: list[PoolName] = Field(default_factory=list, max_length=16)
    region: Text | None = None  # preferred nodes' locality label (router.pools)


class StaticKey(KeyLimits):
    name: KeyName
    hash: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")  # of the whole key
    key_env: EnvVar | None = None  # or: the environment variable holding the key

    @model_validator(mode="after")
    def _one_source(self) -> StaticKey:
        if (self.hash is None) == (self.key_env is None):
            raise ValueError("give exactly one of hash and key_env")
        return self


class AuthConfig(_Strict):
    required: bool = False  # true: every inference request needs a client key
    keys: list[StaticKey] = Field(default_factory=list)
    max_keys: int = Field(10_000, ge=1, le=1_000_000)  # dynamic keys, over all replicas


class PriorityConfig(_Strict):
    # At a model's capacity (router.gate): batch requests take at most this share
    # of it while interactive requests wait.
    batch_max_share: float = Field(0.5, ge=0, le=1)
    # Batch goes beyond its share only after no interactive request came for this long.
    interactive_quiet_s: float = Field(5.0, ge=0, le=3600)
    # The capacity of nodes that declare no max_concurrency label; None: unknown.
    node_slots: int | None = Field(None, ge=1, le=100_000)


class PoolSlo(_Strict):
    """What a pool must meet to keep its traffic (over ``pools.window_s``)."""

    ttfb_p95_ms: float | None = Field(None, gt=0)
    error_rate: float | None = Field(None, gt=0, le=1)


class PoolsConfig(_Strict):
    """Nodes grouped by a label into pools tried in order (router.pools)."""

    label: LabelKey = "pool"
    order: list[PoolName] = Field(min_length=1, max_length=16)
    # A pool whose nodes are all at their capacity is waited for this long, then skipped.
    spill_after_ms: float = Field(0.0, ge=0, le=600_000)
    slo: PoolSlo = Field(default_factory=PoolSlo)
    window_s: int = Field(30, ge=2, le=600)  # seconds of attempts the SLO is judged on
    min_requests: int = Field(20, ge=1)  # fewer attempts in the window: no verdict
    recover_s: float = Field(30.0, ge=0, le=3600)  # within the SLO this long: traffic returns
    trickle: float = Field(0.05, ge=0, le=1)  # share of requests a spilling pool still gets
    # A self-registered node's pool label is its own claim: unless trusted, such
    # nodes are all in the first pool.
    trust_joined_labels: bool = False

    @field_validator("order")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(v) != len(set(v)):
            raise ValueError("pool names must be unique")
        return v


class LocalityConfig(_Strict):
    """Prefer nodes whose ``label`` matches the caller's region, as a tie-breaker."""

    label: LabelKey = "region"


class ShutdownConfig(_Strict):
    # On SIGTERM: keep accepting for grace_s while /readyz fails (load balancers take
    # the router out), then stop accepting and give requests in flight drain_s.
    grace_s: float = Field(5.0, ge=0, le=300)
    drain_s: float = Field(60.0, gt=0, le=3600)


class AdminConfig(_Strict):
    token_env: EnvVar | None = None


class Config(_Strict):
    listen: Listen = Field(default_factory=Listen)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    nodes: list[NodeConfig] = Field(default_factory=list)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries = Field(default_factory=Retries)
    limits: Limits = Field(default_factory=Limits)
    scoring: Scoring = Field(default_factory=Scoring)
    state: StateConfig = Field(default_factory=StateConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    registry: JoinConfig = Field(default_factory=JoinConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    models: dict[ModelName, ModelConfig] = Field(default_factory=dict)
    hedge: HedgeConfig = Field(default_factory=HedgeConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    resume: ResumeConfig = Field(default_factory=ResumeConfig)
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    priority: PriorityConfig = Field(default_factory=PriorityConfig)
    pools: PoolsConfig | None = None
    locality: LocalityConfig = Field(default_factory=LocalityConfig)

    @property
    def aliases(self) -> dict[str, str]:
        """Each model alias, and the model it names (``models.<name>.aliases``)."""
        return {a: name for name, m in self.models.items() for a in m.aliases}

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Config:
        if not (info.context or {}).get("collect"):  # parse_config gathers them all itself
            for problem in cross_checks(self):
                raise ValueError(str(problem))
        return self


def cross_checks(
    cfg: Config,
    broken: AbstractSet[str] = frozenset(),
    at: Callable[[Loc], Loc] | None = None,
) -> Iterator[Problem]:
    """The checks across fields of ``cfg``. Those that read a section in ``broken`` (one
    with errors of its own, so at its defaults in ``cfg``) are left out; ``at`` maps a
    location in ``cfg`` to the file's (``cfg`` may lack the list items with errors)."""
    at = at or _same
    if "nodes" not in broken:
        first: dict[str, int] = {}
        for i, node in enumerate(cfg.nodes):
            if (j := first.setdefault(node.id, i)) != i:
                also = key_path(at(("nodes", j)))
                yield Problem(at(("nodes", i, "id")), f"duplicate node id {node.id!r} ({also})")
    if "auth" not in broken:
        first = {}
        for i, key in enumerate(cfg.auth.keys):
            if (j := first.setdefault(key.name, i)) != i:
                also = key_path(at(("auth", "keys", j)))
                yield Problem(
                    at(("auth", "keys", i, "name")), f"duplicate key name {key.name!r} ({also})"
                )
        if "pools" not in broken:
            known = set(cfg.pools.order) if cfg.pools else set()
            for i, key in enumerate(cfg.auth.keys):
                if unknown := ", ".join(p for p in key.pools if p not in known):
                    where = at(("auth", "keys", i, "pools"))
                    yield Problem(where, f"{unknown}: not in pools.order")
    if "models" not in broken:
        owner: dict[str, str] = {}
        for name, model in cfg.models.items():
            if name in model.fallbacks:
                yield Problem(("models", name, "fallbacks"), "a model cannot fall back to itself")
            for alias in model.aliases:
                where = at(("models", name, "aliases"))
                if alias in cfg.models:
                    yield Problem(where, f"{alias!r} is a model of its own, not an alias")
                elif owner.setdefault(alias, name) != name:
                    yield Problem(where, f"{alias!r} is already an alias of {owner[alias]!r}")
    if "state" not in broken and cfg.state.cluster and not cfg.state.redis_url:
        yield Problem(("state", "redis_url"), "required with state.cluster")
    if "policy" not in broken:
        yield from policy_problems(cfg.policy)


def policy_problems(policy: PolicyConfig) -> Iterator[Problem]:
    """An unknown policy or parameter (with the closest known one), or parameters the
    policy refuses as ``serve`` will build it."""
    from policies import POLICIES, PolicyError, build_policy, policy_params

    if policy.name not in POLICIES:
        hint = did_you_mean(policy.name, POLICIES)
        yield Problem(("policy", "name"), f"unknown policy {policy.name!r}{hint}")
        return
    takes = policy_params(policy.name)
    if takes is not None:
        unknown = [p for p in policy.params if p not in takes]
        for p in unknown:
            hint = did_you_mean(p, takes) or f" (policy {policy.name} takes none)"
            yield Problem(("policy", "params", p), f"unknown parameter{hint}")
        if unknown:
            return
    try:
        build_policy(policy.name, policy.params)
    except PolicyError as e:
        yield Problem(("policy", "params"), str(e).removeprefix(f"policy {policy.name}: "))


def _unwrap(tp: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        else:
            return tp


def _section_at(loc: Loc) -> type[BaseModel] | None:
    """The config section (model) at ``loc``, if there is one."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def validation_problems(err: ValidationError) -> list[Problem]:
    """Pydantic's errors as problems; an unknown key with the closest known one."""
    found = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_type" and type(e["input"]) in (int, float):
            msg += " (quote it: YAML reads it as a number)"
        elif e["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            msg = "unknown key" + (
                did_you_mean(str(loc[-1]), section.model_fields).partition(" (")[0]
                if section is not None
                else ""
            )
        found.append(Problem(loc, msg))
    return found


def format_errors(err: ValidationError) -> str:
    return "\n".join(map(str, validation_problems(err)))


def located(problems: Iterable[Problem], lines: Mapping[Loc, int]) -> list[Problem]:
    """``problems`` with the YAML line of their key (or of its nearest enclosing key
    the file has: a missing field is reported at its section), in file order."""

    def line(loc: Loc) -> int | None:
        for n in range(len(loc), 0, -1):
            if (at := lines.get(loc[:n])) is not None:
                return at
        return None

    found = [p if p.line is not None else Problem(p.loc, p.message, line(p.loc)) for p in problems]
    return sorted(found, key=lambda p: (p.line is None, p.line or 0))


def _same(loc: Loc) -> Loc:
    return loc


ITEM_LISTS: tuple[Loc, ...] = (("nodes",), ("auth", "keys"))  # checked item by item


def _valid_part(
    data: dict[str, Any], errors: list[Loc]
) -> tuple[dict[str, Any], set[str], Callable[[Loc], Loc]]:
    """The part of ``data`` without errors, for the checks across fields: the sections
    without errors, less the items with errors of ``ITEM_LISTS``; the sections left
    out; and the map from a location in that part to the same in ``data``."""
    broken: set[str] = set()
    bad_items: dict[Loc, set[int]] = {}
    for loc in errors:
        lst = next((p for p in ITEM_LISTS if loc[: len(p)] == p and len(loc) > len(p)), None)
        if lst is not None and isinstance(loc[len(lst)], int):
            bad_items.setdefault(lst, set()).add(loc[len(lst)])
        elif loc:
            broken.add(loc[0])
    part = {k: v for k, v in data.items() if k not in broken}
    kept: dict[Loc, list[int]] = {}
    for lst, bad in bad_items.items():
        parent = part
        for k in lst[:-1]:
            if not isinstance(parent.get(k), dict):
                break
            parent = parent[k] = dict(parent[k])  # a copy: ``data`` stays as given
        else:
            if isinstance(items := parent.get(lst[-1]), list):
                kept[lst] = [i for i in range(len(items)) if i not in bad]
                parent[lst[-1]] = [items[i] for i in kept[lst]]

    def at(loc: Loc) -> Loc:
        for lst, index in kept.items():
            n = len(lst)
            if loc[:n] == lst and len(loc) > n and isinstance(loc[n], int):
                return (*lst, index[loc[n]], *loc[n + 1 :])
        return loc

    return part, broken, at


def parse_config(
    data: Any, env: Mapping[str, str] | None = None, lines: Mapping[Loc, int] | None = None
) -> Config:
    """Validate a decoded YAML document and apply environment overrides.

    Every problem is found in one pass and raised together (``ConfigError.problems``):
    pydantic's errors, variables named by ``*_env`` fields that ``env`` lacks, and the
    checks across fields (on the sections without errors of their own), each with its
    line when ``lines`` (from ``load_yaml``) says where its key is."""
    env = os.environ if env is None else env
    lines = lines or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.of([Problem((), "the config must be a mapping", lines.get(()))])
    problems: list[Problem] = []
    broken: set[str] = set()
    at = _same
    try:
        cfg: Config | None = Config.model_validate(data, context={"env": env, "collect": True})
    except ValidationError as e:
        problems += validation_problems(e)
        errors = [tuple(x["loc"]) for x in e.errors() if x["type"] != ENV_UNSET]
        data, broken, at = _valid_part(data, errors)
        try:  # unset variables are reported already
            cfg = Config.model_validate(data, context={"collect": True})
        except ValidationError:
            cfg = None
    if cfg is not None:
        if url := env.get("BALLAST_REDIS_URL"):
            cfg = cfg.model_copy(update={"state": cfg.state.model_copy(update={"redis_url": url})})
        problems += cross_checks(cfg, broken, at)
    if problems or cfg is None:
        raise ConfigError.of(located(problems, lines))
    return cfg


def load_yaml(text: str) -> tuple[Any, dict[Loc, int], list[Problem]]:
    """A YAML document, the line (from 1) of each of its mapping keys and sequence
    items by key path, and its duplicate keys (PyYAML keeps the last one silently);
    ``yaml.YAMLError`` when it is not YAML."""
    loader = yaml.SafeLoader(text)
    lines: dict[Loc, int] = {}
    duplicates: list[Problem] = []
    seen: set[int] = set()  # each node once: an alias's lines are its anchor's

    def walk(node: yaml.Node, loc: Loc) -> None:
        if id(node) in seen:  # an alias (walking it again would grow exponentially)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue  # merged keys (<<) are reported at the mapping that merges them
                here = (*loc, loader.construct_object(key_node))
                line = key_node.start_mark.line + 1
                if here in lines:  # the last one counts: its lines replace the first's
                    problem = f"duplicate key (first at line {lines[here]}); give it once"
                    duplicates.append(Problem(here, problem, line))
                    for inner in [k for k in lines if k[: len(here)] == here]:
                        del lines[inner]
                lines[here] = line
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*loc, i), item.start_mark.line + 1)
                walk(item, (*loc, i))

    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines, duplicates
        walk(node, ())
        return loader.construct_document(node), lines, duplicates
    finally:
        loader.dispose()


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """The config in the file at ``path``; ``ConfigError`` with every problem in it."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {path}: not UTF-8 text") from None
    try:
        data, lines, problems = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        why = getattr(e, "problem", None) or str(e)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {why}{at}") from None
    try:
        cfg = parse_config(data, env, lines)
    except ConfigError as e:
        raise ConfigError.of(located([*problems, *e.problems], lines)) from None
    if problems:
        raise ConfigError.of(problems)
    return cfg
