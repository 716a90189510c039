"""The Lua scripts the Redis store runs, each with its arguments spelled out.

Every script that changes a node bumps the sequence counter and records
``node id -> sequence`` in the *changes* sorted set, so other processes pull
just the nodes changed since the last sequence they saw; urgent changes are
also published on the *events* channel. All keys share one hash tag, so the
scripts run on Redis Cluster too. The merge of measured outcomes is
:data:`router.measure.merge.MERGE_LUA`, beside its Python twin.

KEYS, for every script: 1 node hash, 2 changes, 3 sequence, 4 *seen* (sorted
set of live joined nodes by last heartbeat), 5 *gone* (sorted set of gone
joined nodes by last heartbeat, until they are forgotten).
"""

from __future__ import annotations

# Write a node's fields and announce the change.
# ARGV: 1 node id, 2 events channel, 3 only_if_missing (1: leave an existing node
#       alone), 4 keep_state (1: an existing node keeps its state and reason),
#       5.. field, value pairs.
PUT = """
local node, changes, seq, seen = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local exists = redis.call('EXISTS', node) == 1
if ARGV[3] == '1' and exists then return 0 end
local fields = {}
for i = 5, #ARGV, 2 do
  local k = ARGV[i]
  if not (ARGV[4] == '1' and exists and (k == 'state' or k == 'reason')) then
    table.insert(fields, k)
    table.insert(fields, ARGV[i + 1])
    if k == 'seen' then
      redis.call('ZADD', seen, ARGV[i + 1], ARGV[1])
      redis.call('ZREM', KEYS[5], ARGV[1])
    end
  end
end
if #fields > 0 then redis.call('HSET', node, unpack(fields)) end
redis.call('ZADD', changes, redis.call('INCR', seq), ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# A heartbeat: last seen and telemetry. A node that had expired comes back
# draining (if an operator drained it) or in the given state (registered: to be
# verified again; serving when verification is off).
# ARGV: 1 node id, 2 events channel, 3 now (wall seconds), 4 telemetry JSON,
#       5 state of a returning node, 6 its reason.
BEAT = """
local node, changes, seq, seen = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', node) == 0 then return 0 end
redis.call('HSET', node, 'seen', ARGV[3], 'tel', ARGV[4])
redis.call('ZADD', seen, ARGV[3], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('HGET', node, 'state') == 'gone' then
  if redis.call('HGET', node, 'drained') == '1' then
    redis.call('HSET', node, 'state', 'draining', 'reason', 'drained by an operator')
  else
    redis.call('HSET', node, 'state', ARGV[5], 'reason', ARGV[6])
  end
  redis.call('ZADD', changes, redis.call('INCR', seq), ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
end
return 1
"""

# Expire one joined node whose last heartbeat is older than a limit: it moves
# from *seen* to *gone*.
# ARGV: 1 node id, 2 events channel, 3 limit (wall seconds), 4 reason.
EXPIRE = """
local node, changes, seq, seen = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
redis.call('ZREM', seen, ARGV[1])
local last = tonumber(redis.call('HGET', node, 'seen'))
if last == nil then return 0 end
if last >= tonumber(ARGV[3]) then
  redis.call('ZADD', seen, last, ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[5], last, ARGV[1])
if redis.call('HGET', node, 'state') == 'gone' then return 0 end
redis.call('HSET', node, 'state', 'gone', 'reason', ARGV[4])
redis.call('ZADD', changes, redis.call('INCR', seq), ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# Remove a node. ARGV: 1 node id, 2 events channel.
REMOVE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"""

# Client keys re-published after Redis lost them: each record this process knows
# (unless its id was revoked), and the revocations it knows (which win, in either
# order of the processes re-publishing). The keys' version is bumped when anything
# changed, so every process reloads them.
# KEYS: 1 keys hash, 2 revoked ids set, 3 keys version.
# ARGV: 1 the number of records n, 2 .. 2n+1 id, record pairs, then revoked ids.
REPUBLISH_KEYS = """
local keys, revoked, version = KEYS[1], KEYS[2], KEYS[3]
local n = tonumber(ARGV[1])
local changed = 0
for i = 2 + 2 * n, #ARGV do
  redis.call('SADD', revoked, ARGV[i])
  changed = changed + redis.call('HDEL', keys, ARGV[i])
end
for i = 2, 1 + 2 * n, 2 do
  if redis.call('SISMEMBER', revoked, ARGV[i]) == 0 then
    changed = changed + redis.call('HSETNX', keys, ARGV[i], ARGV[i + 1])
  end
end
if changed > 0 then redis.call('INCR', version) end
return changed
"""

# A day's usage totals restored after Redis lost them, from what each process knows:
# what it counted itself (exact, and including what it counted since the loss), and
# the highest total it read (which covers processes that are gone). Each counter is
# raised to the larger of the sum of every process's own counts and the highest total
# any process read, never added to: restoring twice, in any order of the processes,
# into a hash that kept its data or that was written since, counts nothing twice.
# KEYS: 1 the day's usage hash, 2 what each process reported (by process, the sum,
# the highest total read). ARGV: 1 retention in seconds, 2 this process's id, then
# field, own count, highest total read triples.
RESTORE_USAGE = """
local usage, restored, me = KEYS[1], KEYS[2], ARGV[2]
local raised = 0
for i = 3, #ARGV, 3 do
  local f, mine, seen = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local by = 'by\t' .. me .. '\t' .. f
  local before = tonumber(redis.call('HGET', restored, by) or '0')
  local sum = tonumber(redis.call('HGET', restored, 'sum\t' .. f) or '0')
  if mine > before then
    redis.call('HSET', restored, by, mine)
    sum = redis.call('HINCRBY', restored, 'sum\t' .. f, mine - before)
  end
  local read = tonumber(redis.call('HGET', restored, 'seen\t' .. f) or '0')
  if seen > read then
    redis.call('HSET', restored, 'seen\t' .. f, seen)
    read = seen
  end
  local target = math.max(sum, read)
  if tonumber(redis.call('HGET', usage, f) or '0') < target then
    redis.call('HSET', usage, f, target)
    raised = raised + 1
  end
end
redis.call('EXPIRE', usage, ARGV[1])
redis.call('EXPIRE', restored, ARGV[1])
return raised
"""

# A usage counter read lower than a process knew it (Redis lost recent writes, as a
# replica promoted before it had them): what was missing at the read is added back,
# once, unless other processes' counts since brought it up to what was known (so
# their counts since the read are kept, not overwritten).
# KEYS: 1 the day's usage hash. ARGV: field, total known, total read triples.
RAISE_USAGE = """
for i = 1, #ARGV, 3 do
  local known, read = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') < known then
    redis.call('HINCRBY', KEYS[1], ARGV[i], known - read)
  end
end
return 1
"""
