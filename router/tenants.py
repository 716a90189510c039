"""Client keys: who is calling, what each key may do, and what each has used.

A key looks like ``sk-bal-<43 random characters>``. It is shown once, when it is
created, and kept only as its SHA-256 (with a short prefix for display): keys
are long random strings, so a plain hash cannot be reversed. Static keys come
from the config (``auth.keys``: by hash, or read from an environment variable);
dynamic ones are created through the admin API and live in the state store, so
every replica knows them (:class:`Keyring`).

Limits are decided in this process, without awaiting the store
(:class:`Limiter`): requests per minute by GCRA, tokens per minute by a token
bucket (debited by an estimate at admission and corrected by the node's
``usage`` when the answer ends), parallel requests by a counter. Each process
enforces ``share`` of every key's limits, with share = 1 / the number of live
router processes sharing the store, recomputed when that number changes.

Usage (requests, errors, prompt and completion tokens per key and model) is
counted in memory (:class:`Usage`) and flushed by the store's background sync;
keys with a token budget per UTC day or month are refused once the store's
count for the period (read every second) and this process's since reach it.
"""

from __future__ import annotations

import calendar
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp.hdrs import AUTHORIZATION
from multidict import istr

from router.config import AuthConfig, KeyLimits

KEY_PREFIX = "sk-bal-"
DISPLAY_CHARS = 12  # of a key shown in listings: "sk-bal-AbCdE"
BURST_S = 1.0  # requests a key may send at once: one second's worth of its rate (at least 1)
# Besides Authorization: Bearer (istr: looked up without case-folding each time).
KEY_HEADERS = (istr("api-key"), istr("x-api-key"))
# OpenAI's rate-limit headers, as case-insensitive names made once
RATE_LIMIT_HEADERS = tuple(
    istr(f"x-ratelimit-{what}-{unit}")
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)
LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS, LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS = (
    RATE_LIMIT_HEADERS
)
HEADERS_TTL_S = 0.05  # a busy key's rate-limit headers are reused for this long
BUDGET_RETRY_S = 1.0  # a budget held by requests in progress: try again after this
SEEN_KEYS = 4096  # valid keys remembered as presented (cleared when the keys change)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def period_of(period: str, wall: float) -> str:
    """The UTC day (YYYY-MM-DD) or month (YYYY-MM) of ``wall``."""
    return time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", time.gmtime(wall))


def period_end(period: str, wall: float) -> float:
    """When the UTC day or month of ``wall`` ends."""
    t = time.gmtime(wall)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def period_days(period: str, wall: float) -> list[str]:
    """The UTC days of the period of ``wall`` so far."""
    day = time.strftime("%Y-%m-%d", time.gmtime(wall))
    if period == "day":
        return [day]
    return [f"{day[:8]}{d:02d}" for d in range(1, int(day[8:]) + 1)]


@dataclass(slots=True)
class Refusal:
    """Why a key's request is refused: the status, the error's type and code, a
    message, when to try again (seconds, for Retry-After) and, over a rate limit,
    the key's rate-limit headers."""

    status: int
    type: str
    code: str
    message: str
    retry_after: float | None = None
    headers: dict[str, str] | None = None


class Limiter:
    """One key's limits as this process enforces them (``share`` of each)."""

    __slots__ = (
        "cached",
        "cap",
        "headers_at",
        "limits",
        "parallel",
        "plimit",
        "rpm",
        "share",
        "t",
        "tat",
        "texts",
        "tokens",
        "tokens_at",
        "tolerance",
        "tpm",
    )  # fmt: skip

    def __init__(self, limits: KeyLimits, share: float, now: float) -> None:
        self.limits = limits
        self.rpm, self.tpm = limits.rpm or 0, limits.tpm or 0  # 0: no such limit
        self.texts = (str(self.rpm), str(self.tpm))
        self.tat = now  # GCRA: the theoretical arrival time of the next request
        self.tokens_at = now
        self.parallel = 0
        self.cached: dict[str, str] = {}
        self.headers_at = -1.0
        self.share = 0.0
        self.tokens = 0.0
        self.set_share(share)
        self.tokens = self.cap  # a full minute to start with

    def set_share(self, share: float) -> None:
        """Enforce ``share`` of the key's limits from now on."""
        self.share = share
        self.t = 60.0 / (self.rpm * share) if self.rpm else 0.0  # between two requests
        self.tolerance = max(self.t, BURST_S)
        self.cap = float(self.tpm) * share  # the token bucket: a minute's worth
        mp = self.limits.max_parallel
        self.plimit = max(1, round(mp * share)) if mp is not None else 0
        self.tokens = min(self.tokens, self.cap)

    def available(self, now: float) -> float:
        """Tokens the bucket holds now (when the key has a tpm limit)."""
        self._refill(now)
        return self.tokens

    def _refill(self, now: float) -> None:
        tokens = self.tokens + (now - self.tokens_at) * self.cap / 60.0
        self.tokens = tokens if tokens < self.cap else self.cap
        self.tokens_at = now

    def admit(self, now: float, estimate: int) -> Refusal | None:
        if self.plimit and self.parallel >= self.plimit:
            return _over_limit("too many requests in progress", 1.0)
        t = self.t
        if t and self.tat - now > self.tolerance - t:
            wait = self.tat - now - (self.tolerance - t)
            return _over_limit(f"over {self.rpm} requests per minute", wait)
        if self.tpm:  # _refill, inline on the request path
            cap = self.cap
            tokens = self.tokens + (now - self.tokens_at) * cap / 60.0
            self.tokens = tokens = tokens if tokens < cap else cap
            self.tokens_at = now
            need = estimate if estimate < cap else cap  # larger: a full bucket
            if tokens < need:
                wait = (need - tokens) * 60.0 / cap
                return _over_limit(f"over {self.tpm} tokens per minute", wait)
            self.tokens -= estimate
        if t:
            self.tat = (self.tat if self.tat > now else now) + t
        self.parallel += 1
        return None

    def done(self, estimate: int, actual: int) -> None:
        """The request ended: its tokens as counted by the node, not as estimated."""
        self.parallel -= 1
        if self.tpm:
            tokens = self.tokens - (actual - estimate)
            # A long answer's debt is at most a minute's worth: it delays, never locks out.
            self.tokens = tokens if tokens > -self.cap else -self.cap

    def headers(self, now: float, fresh: bool = False) -> dict[str, str]:
        """OpenAI's rate-limit headers, for the whole key (this process's view; the
        resets in milliseconds). Computed at most every ``HEADERS_TTL_S`` for a busy
        key (``fresh``: now), so answers may show figures that old."""
        if not fresh and now - self.headers_at < HEADERS_TTL_S:
            return self.cached
        out: dict[str, str] = {}
        self.cached, self.headers_at = out, now
        share = self.share
        t = self.t
        if t:
            ahead = self.tat - now
            if ahead < 0.0:
                ahead = 0.0
            left = int((self.tolerance - ahead) / t / share) if ahead < self.tolerance else 0
            out[LIMIT_REQUESTS] = self.texts[0]
            out[REMAINING_REQUESTS] = str(left) if left < self.rpm else self.texts[0]
            out[RESET_REQUESTS] = f"{int(ahead * 1000)}ms"
        if self.tpm:
            self._refill(now)
            tokens = self.tokens
            out[LIMIT_TOKENS] = self.texts[1]
            out[REMAINING_TOKENS] = str(int(tokens / share)) if tokens > 0 else "0"
            out[RESET_TOKENS] = f"{int((self.cap - tokens) * 60000 / self.cap)}ms"
        return out


def _over_limit(message: str, retry_after: float) -> Refusal:
    return Refusal(429, "requests", "rate_limit_exceeded", message, retry_after)


@dataclass(eq=False)
class Key:
    id: str
    name: str
    hash: str
    prefix: str  # shown in listings
    limits: KeyLimits
    source: str  # "config" or "admin"
    created_at: float = 0.0
    limiter: Limiter | None = None  # None: no rate, token or parallel limit
    models: frozenset[str] = field(default_factory=frozenset)  # empty: every model
    expires_at: float | None = None  # Unix time (limits.expires_at)

    def public(self) -> dict[str, Any]:
        """What listings show: never the key or its hash."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "source": self.source,
            "created_at": self.created_at,
            **self.limits.model_dump(),
        }

    def record(self) -> dict[str, Any]:
        """What the store keeps of a dynamic key."""
        return {**self.public(), "hash": self.hash}


def _limited(limits: KeyLimits) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.max_parallel is not None


class Keyring:
    """Every key this process accepts, by hash; static ones from the config, dynamic
    ones as the store last reported them."""

    def __init__(
        self,
        cfg: AuthConfig,
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.required = cfg.required
        self.max_keys = cfg.max_keys
        # alias -> model: an allow-list may name a model by any of its names
        self.aliases = dict(aliases or {})
        self.clock = clock
        self.wall = wall
        self.share = 1.0
        self.by_hash: dict[str, Key] = {}
        self.active = False
        self.usage = Usage()  # flushed to the store in the background
        # Token budgets: the store's count at its last sync, this process's since, and
        # the period (UTC day or month) that count is for, per key name.
        self._budget_base: dict[str, int] = {}
        self._budget_local: dict[str, int] = {}
        self._budget_period: dict[str, str] = {}
        # Tokens estimated for requests admitted and not yet settled, per key name:
        # reserved against the budget at admission, so that a burst cannot overrun it.
        self._budget_reserved: dict[str, int] = {}
        self.static: dict[str, Key] = {}
        for k in cfg.keys:
            digest = k.hash or hash_key(env[k.key_env or ""])
            limits = KeyLimits(**k.model_dump(include=set(KeyLimits.model_fields)))
            key = self._make(f"cfg-{k.name}", k.name, digest, "", limits, "config", 0.0)
            self.static[key.id] = key
        self.dynamic: dict[str, Key] = {}
        self._index()

    def _make(
        self, id: str, name: str, digest: str, prefix: str, limits: KeyLimits, source: str,
        created_at: float,
    ) -> Key:  # fmt: skip
        limiter = Limiter(limits, self.share, self.clock()) if _limited(limits) else None
        return Key(id, name, digest, prefix, limits, source, created_at, limiter,
                   frozenset(self.aliases.get(m, m) for m in limits.models),
                   limits.expires_at)  # fmt: skip

    def _index(self) -> None:
        self.by_hash = {k.hash: k for k in (*self.static.values(), *self.dynamic.values())}
        # Authorization header -> Key: each key hashed once, not on every request
        self._seen: dict[str, Key] = {}
        # Whether requests are looked at at all: keys exist, or they are required.
        self.active = self.required or bool(self.by_hash)

    def by_name(self, name_or_id: str) -> Key | None:
        for key in (*self.dynamic.values(), *self.static.values()):
            if name_or_id in (key.id, key.name):
                return key
        return None

    def adopt(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """The store's dynamic keys (all of them): new ones added, changed ones
        updated (keeping their limiter's state while the limits stay the same),
        missing ones revoked."""
        keys: dict[str, Key] = {}
        for kid, rec in records.items():
            try:
                limits = KeyLimits(**{f: rec.get(f) for f in KeyLimits.model_fields if f in rec})
                old = self.dynamic.get(kid)
                if old is not None and old.limits == limits and old.hash == rec["hash"]:
                    keys[kid] = old
                    continue
                created = float(rec.get("created_at", 0.0))
                prefix = str(rec.get("prefix", ""))
                keys[kid] = self._make(
                    kid, str(rec["name"]), str(rec["hash"]), prefix, limits, "admin", created
                )
            except (KeyError, TypeError, ValueError):
                continue  # a record this version cannot read: not a key it accepts
        self.dynamic = keys
        self._index()

    # -- token budgets per UTC day or month ----------------------------------------------

    def budgeted(self) -> dict[str, str]:
        """Key names with a token budget, and their period (day or month)."""
        return {
            k.name: k.limits.budget_period
            for k in self.by_hash.values()
            if k.limits.budget_tokens is not None
        }

    def spent(self, name: str, tokens: int) -> None:
        """Tokens a key used through this process since the store's last count."""
        if name in self._budget_base:
            self._budget_local[name] = self._budget_local.get(name, 0) + tokens

    def adopt_spent(self, totals: Mapping[str, int], period: Mapping[str, str]) -> None:
        """The store's count of each budgeted key's tokens in its current period
        (this process's usage flushed just before): it replaces the local count. A
        count lower than the last one of the same period (the store lost it) does
        not renew a budget: the higher stands."""
        old, old_period = self._budget_base, self._budget_period
        self._budget_base = {
            name: max(total, old.get(name, 0)) if old_period.get(name) == period.get(name)
            else total
            for name, total in totals.items()
        }  # fmt: skip
        self._budget_period = dict(period)
        self._budget_local = {}

    def over_budget(self, key: Key, wall: float) -> Refusal | None:
        """Why the key's budget admits no more now, else None.

        Used up: the store's count and this process's since reach the budget (until
        the period ends). Or this process's share is in use: what it used and
        reserved since the store's count reaches its ``share`` of what that count
        left (until the next sync, when the shares are dealt again). So N replicas
        together overrun a budget by at most one request's estimate each."""
        budget = key.limits.budget_tokens
        if budget is None:
            return None
        name = key.name
        self._roll_period(key, wall)
        base = self._budget_base.get(name, 0)
        local = self._budget_local.get(name, 0)
        mine = local + self._budget_reserved.get(name, 0)
        what = f"key {name} has used its token budget for the {key.limits.budget_period}"
        if base + local >= budget:
            renews_in = period_end(key.limits.budget_period, wall) - wall
            return Refusal(429, "insufficient_quota", "insufficient_quota", what, renews_in)
        if base + mine < budget and mine < (budget - base) * self.share:
            return None
        what = f"key {name} is near its token budget: its requests in progress may use the rest"
        return Refusal(429, "rate_limit_error", "budget_reserved", what, BUDGET_RETRY_S)

    def _roll_period(self, key: Key, wall: float) -> None:
        """A new UTC day or month: the key's count for the period starts again."""
        name = key.name
        period = period_of(key.limits.budget_period, wall)
        if self._budget_period.get(name) != period:
            self._budget_base[name] = 0
            self._budget_local[name] = 0
            self._budget_period[name] = period

    def no_room(self, key: Key) -> Refusal:
        """What a request of ``key`` gets when its caps leave it no room to answer."""
        return _over_limit(
            f"rate limit reached for key {key.name}: no tokens left for an answer now",
            BUDGET_RETRY_S,
        )

    def allowance(self, key: Key) -> tuple[int, bool] | None:
        """The most tokens a request of ``key`` may use now in this process: what its
        token bucket holds and what its budget share leaves, and whether that is the
        last of the budget itself (not a bucket that refills or a share held by
        requests in progress); None: no token limit, or none left, which
        :meth:`admit` refuses. A request that could use more is limited to this
        (``max_tokens``), so a limit-less or huge request cannot overrun a hard cap."""
        most: float | None = None
        last = False
        limiter = key.limiter
        if limiter is not None and limiter.tpm:
            most = limiter.available(self.clock())
        budget = key.limits.budget_tokens
        if budget is not None:
            name = key.name
            self._roll_period(key, self.wall())
            base = self._budget_base.get(name, 0)
            local = self._budget_local.get(name, 0)
            mine = local + self._budget_reserved.get(name, 0)
            total = budget - base - local
            left = min(total, (budget - base) * self.share - mine)
            if most is None or left < most:
                most, last = left, left == total
        # None as well once nothing is left: admission refuses it, saying why and when.
        return None if most is None or most <= 0 else (int(most), last)

    # -- a request made with a key -----------------------------------------------------

    def admit(self, key: Key, model: str, estimate: int) -> Refusal | dict[str, str] | None:
        """Whether ``key`` may send a request for ``model`` of about ``estimate``
        tokens: why not, or the rate-limit headers its answer carries (None: the key
        has no limits). Admitted, it holds its share of the key's limits until
        :meth:`settle`."""
        if key.models and model not in key.models:
            message = f"this key may not use the model {model[:64]!r}"
            return Refusal(403, "invalid_request_error", "model_not_allowed", message)
        if key.limits.budget_tokens is not None:
            refused = self.over_budget(key, self.wall())
            if refused is not None:
                return refused
        limiter = key.limiter
        if limiter is None:
            self._reserve(key, estimate)
            return None
        now = self.clock()
        refused = limiter.admit(now, estimate)
        if refused is None:
            self._reserve(key, estimate)
            return limiter.headers(now)
        self.usage.add(key.name, model, 429, (0, 0))
        refused.message = f"rate limit reached for key {key.name}: {refused.message}"
        refused.headers = limiter.headers(now, fresh=True)
        return refused

    def _reserve(self, key: Key, estimate: int) -> None:
        if key.limits.budget_tokens is not None:
            reserved = self._budget_reserved
            reserved[key.name] = reserved.get(key.name, 0) + estimate

    def settle(
        self, key: Key, model: str, status: int, tokens: tuple[int, int], estimate: int
    ) -> None:
        """An admitted request ended: its usage, and its tokens as billed (not as
        estimated) in the key's token bucket and budget, whose reservation ends."""
        self.usage.add(key.name, model, status, tokens)
        if key.limiter is not None:
            key.limiter.done(estimate, tokens[0] + tokens[1])
        if key.limits.budget_tokens is not None:
            reserved = self._budget_reserved
            left = reserved.get(key.name, 0) - estimate
            if left > 0:
                reserved[key.name] = left
            else:
                reserved.pop(key.name, None)
            self.spent(key.name, tokens[0] + tokens[1])

    def set_share(self, share: float) -> None:
        """This process's share of every key's limits (1 / live router processes)."""
        if share == self.share:
            return
        self.share = share
        for key in self.by_hash.values():
            if key.limiter is not None:
                key.limiter.set_share(share)

    def lookup(self, headers: Mapping[str, str]) -> Key | str | None:
        """The request's key; None when it has none that counts (allowed unless keys
        are required); a string: why it is refused (401)."""
        auth = headers.get(AUTHORIZATION)
        key = self._seen.get(auth) if auth is not None else None  # presented before
        if key is None:
            found = self._find(auth, headers)
            if not isinstance(found, Key):
                return found
            key = found
        if key.expires_at is not None and self.wall() >= key.expires_at:
            return "expired API key"
        return key

    def _find(self, auth: str | None, headers: Mapping[str, str]) -> Key | str | None:
        """``lookup`` for a key not presented before: hashed, and remembered when it
        came as ``Authorization: Bearer <key>`` exactly (other spellings of the same
        key cannot fill the memory)."""
        given = None
        if auth is not None and (auth.startswith("Bearer ") or auth[:7].lower() == "bearer "):
            given = auth[7:].strip()
        else:
            for name in KEY_HEADERS:
                value = headers.get(name)
                if value:
                    given = value.strip()
                    break
        if given is None:
            return "missing API key" if self.required else None
        key = self.by_hash.get(hash_key(given))  # a lookup by hash: nothing to time
        if key is None:
            # Unknown: refused when keys are required, or when it looks like one of
            # ours (revoked, mistyped); any other string (a client's placeholder) is
            # anonymous.
            if self.required or given.startswith(KEY_PREFIX):
                return "invalid API key"
            return None
        if auth == "Bearer " + given and len(self._seen) < SEEN_KEYS:
            self._seen[auth] = key
        return key


class Usage:
    """Requests, errors and tokens per (key name, model), since the last flush."""

    FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], list[int]] = {}

    def add(self, key: str, model: str, status: int, tokens: tuple[int, int]) -> None:
        row = self.pending.get((key, model))
        if row is None:
            self.pending[(key, model)] = [1, int(status >= 400), *tokens]
            return
        row[0] += 1
        if status >= 400:
            row[1] += 1
        row[2] += tokens[0]
        row[3] += tokens[1]

    def take(self) -> dict[tuple[str, str], list[int]]:
        taken, self.pending = self.pending, {}
        return taken

    def restore(self, taken: dict[tuple[str, str], list[int]]) -> None:
        """A flush failed: keep its counts for the next one."""
        for k, row in taken.items():
            mine = self.pending.setdefault(k, [0, 0, 0, 0])
            for i, v in enumerate(row):
                mine[i] += v


def usage_from(doc: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an answer's ``usage``, if it has a valid one:
    whole numbers (not booleans) below 2**40, a node's figure bounded like any other."""
    usage = doc.get("usage") if type(doc) is dict else None
    if type(usage) is not dict:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if type(prompt) is int and type(completion) is int and 0 <= prompt < 1 << 40:
        return (prompt, completion) if 0 <= completion < 1 << 40 else None
    return None
