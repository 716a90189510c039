"""Merging one replica's batch of outcomes into the fleet-wide counters.

Each router process flushes what it measured since its last flush (a
:class:`~router.measure.stats.Pending`) to the shared store, where it is merged
atomically into the node's shared estimators, so two replicas never lose each
other's updates. The merge is the same maths as the local estimators:

* decayed success ratio: both counters decay with the half-life from their last
  update, then the batch is added (:class:`~router.measure.decayed_ratio.DecayedRatio`);
* peak-EWMA latency: the batch's slowest sample replaces a lower estimate at
  once; otherwise the estimate moves toward the batch's mean sample with weight
  ``exp(-age / tau)`` (:class:`~router.measure.peak_ewma.PeakEwma`).

:func:`merge` is the Python statement of it; :data:`MERGE_LUA` is what Redis
runs. ``tests/test_measures.py`` runs both on the same inputs and compares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LN2 = math.log(2.0)


@dataclass(slots=True)
class Shared:
    """A node's fleet-wide counters as stored (field names are the hash's)."""

    ok: float = 0.0  # decayed successes
    n: float = 0.0  # decayed attempts
    sr_t: float | None = None  # wall time of the last success-ratio update
    lat: float | None = None  # peak-EWMA latency estimate, seconds
    lat_t: float | None = None  # wall time of the last latency update
    req: int = 0  # attempts, all time
    fail: int = 0  # failed attempts, all time


@dataclass(slots=True)
class Batch:
    attempts: int
    successes: int
    lat_max: float
    lat_mean: float


def merge(s: Shared, b: Batch, now: float, half_life_s: float, tau_s: float) -> Shared:
    """``s`` with ``b`` merged in at wall time ``now`` (a new object)."""
    if b.attempts <= 0:
        return s
    w = 1.0
    if s.n > 0:
        w = math.exp(-(now - (s.sr_t if s.sr_t is not None else now)) * LN2 / half_life_s)
    ok = s.ok * w + b.successes
    n = s.n * w + b.attempts
    if s.lat is None or b.lat_max > s.lat:
        lat = b.lat_max
    else:
        w2 = math.exp(-(now - (s.lat_t if s.lat_t is not None else now)) / tau_s)
        lat = s.lat * w2 + b.lat_mean * (1.0 - w2)
    failed = b.attempts - b.successes
    return Shared(ok, n, now, lat, now, s.req + b.attempts, s.fail + failed)


# KEYS: 1 node hash, 2 changes (sorted set), 3 sequence counter.
# ARGV: 1 node id, 2 now (wall seconds), 3 replica id, 4 this replica's in-flight
#       count, 5 attempts, 6 successes, 7 slowest sample s, 8 mean sample s,
#       9 success half-life s, 10 latency tau s.
# Returns 0 when the node is unknown (removed meanwhile), else 1.
MERGE_LUA = """
local node, changes, seq = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', node) == 0 then return 0 end
local id, now, replica, in_flight = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local attempts, successes = tonumber(ARGV[5]), tonumber(ARGV[6])
local lat_max, lat_mean = tonumber(ARGV[7]), tonumber(ARGV[8])
local half_life, tau = tonumber(ARGV[9]), tonumber(ARGV[10])
if attempts > 0 then
  local h = redis.call('HMGET', node, 'ok', 'n', 'sr_t', 'lat', 'lat_t')
  local ok, n = tonumber(h[1]) or 0, tonumber(h[2]) or 0
  local w = 1
  if n > 0 then
    w = math.exp(-(now - (tonumber(h[3]) or now)) * 0.6931471805599453 / half_life)
  end
  ok = ok * w + successes
  n = n * w + attempts
  local lat = tonumber(h[4])
  if lat == nil or lat_max > lat then
    lat = lat_max
  else
    local w2 = math.exp(-(now - (tonumber(h[5]) or now)) / tau)
    lat = lat * w2 + lat_mean * (1 - w2)
  end
  redis.call('HSET', node, 'ok', ok, 'n', n, 'sr_t', now, 'lat', lat, 'lat_t', now)
  redis.call('HINCRBY', node, 'req', attempts)
  redis.call('HINCRBY', node, 'fail', attempts - successes)
end
redis.call('HSET', node, 'if:' .. replica, in_flight, 'ift:' .. replica, now)
redis.call('ZADD', changes, redis.call('INCR', seq), id)
return 1
"""
