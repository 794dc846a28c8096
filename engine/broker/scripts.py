"""The Lua scripts of cluster mode: leases with fencing epochs, fenced acks, dedup XADD.

Every write a partition owner makes (its group reads, acks, dead letters,
trimming, replies) runs in a script that first checks the fencing epoch: ``INCR`` gives each lease
acquisition a new epoch, and a write carries the epoch its lease was taken
with.  An owner that was paused past its lease (SIGSTOP, GC, swap) finds the
epoch moved on, or the lease held by another node, and its write does
nothing.  A lease that expired without anyone taking it is still the
holder's: its epoch is unchanged, so nothing was handed out in between.

Scripts are sent by SHA (``EVALSHA``) and loaded again when Redis answers
NOSCRIPT (a restarted Redis has an empty script cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

_FENCE = """
local function fenced(lease_key, epoch_key, token, epoch)
  if redis.call('GET', epoch_key) ~= epoch then return true end
  local holder = redis.call('GET', lease_key)
  return holder and holder ~= token
end
"""

ACQUIRE = """
-- KEYS: lease, epoch   ARGV: node, ttl_ms   ->  {epoch, ''} or {0, holder}
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. epoch, 'PX', ARGV[2])
return {epoch, ''}
"""

RENEW = """
-- KEYS: lease, epoch   ARGV: token, epoch, ttl_ms   ->  1 renewed, 2 re-set, 0 lost
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not holder and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 2
end
return 0
"""

RELEASE = """
-- KEYS: lease   ARGV: token   ->  1 released, 0 not ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

SETTLE = (
    _FENCE
    + """
-- KEYS: stream, lease, epoch, dlq
-- ARGV: token, epoch, group, minid ('' = no trim), dlq_max,
--       n_ids, ids..., n_letters, (n_fields, fields...)..., n_notices, (channel, payload)...
-- -> entries acked, or -1 when fenced (nothing written)
if fenced(KEYS[2], KEYS[3], ARGV[1], ARGV[2]) then return -1 end
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
local i = 6
local n = tonumber(ARGV[i]); i = i + 1
local ids = {}
for j = 1, n do ids[j] = ARGV[i]; i = i + 1 end
local letters = tonumber(ARGV[i]); i = i + 1
for j = 1, letters do
  local k = tonumber(ARGV[i]); i = i + 1
  local args = {'XADD', KEYS[4], 'MAXLEN', ARGV[5], '*'}
  for f = 1, k do args[#args + 1] = ARGV[i]; i = i + 1 end
  redis.call(unpack(args))
end
local acked = 0
if n > 0 then acked = redis.call('XACK', KEYS[1], ARGV[3], unpack(ids)) end
local notices = tonumber(ARGV[i]); i = i + 1
for j = 1, notices do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  i = i + 2
end
local minid = ARGV[4]
if minid ~= '' then
  -- Never past an unacknowledged entry: the group's oldest pending one bounds it too.
  local summary = redis.call('XPENDING', KEYS[1], ARGV[3])
  if summary[1] > 0 and older(summary[2], minid) then minid = summary[2] end
  redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
end
return acked
"""
)

READ = (
    _FENCE
    + """
-- KEYS: stream, lease, epoch   ARGV: token, epoch, group, consumer, count, cursor
-- -> -1 when fenced (nothing read), {1, {{id, fields}...}}, or {0, last id of the stream}
-- A group read is a write: it moves entries into the pending list and the group's
-- cursor past them.  Unfenced, a read sent by an owner paused past its lease would
-- hide new entries from its successor (already past the pending ones) until the
-- partition changed hands again.
if fenced(KEYS[2], KEYS[3], ARGV[1], ARGV[2]) then return -1 end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                     'STREAMS', KEYS[1], ARGV[6])
if r and #r[1][2] > 0 then return {1, r[1][2]} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then return {0, last[1][1]} end
return {0, '0-0'}
"""
)

REPLY = (
    _FENCE
    + """
-- KEYS: lease, epoch   ARGV: token, epoch, channel, payload  ->  receivers, or -1 when fenced
if fenced(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return -1 end
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""
)

PRODUCE = """
-- KEYS: stream, dedup keys...   ARGV: window_s, header, n, (has_key, id, data)...
-- Each message with a dedup key is kept only if SET NX of its key succeeds; the kept
-- ones become one entry (a msgpack array).  -> {entry id or '', (index, first id)...}
local kept = {}
local out = {''}
local k = 2
local i = 4
for j = 1, tonumber(ARGV[3]) do
  local keep = true
  if ARGV[i] == '1' then
    if not redis.call('SET', KEYS[k], ARGV[i + 1], 'NX', 'EX', ARGV[1]) then
      keep = false
      out[#out + 1] = j
      out[#out + 1] = redis.call('GET', KEYS[k])
    end
    k = k + 1
  end
  if keep then kept[#kept + 1] = ARGV[i + 2] end
  i = i + 3
end
local n = #kept
if n > 0 then
  local head
  if n < 16 then head = string.char(0x90 + n)
  elseif n < 65536 then head = string.char(0xdc, math.floor(n / 256), n % 256)
  else head = string.char(0xdd, math.floor(n / 16777216), math.floor(n / 65536) % 256,
                          math.floor(n / 256) % 256, n % 256) end
  out[1] = redis.call('XADD', KEYS[1], '*', 'm', head .. table.concat(kept), 'h', ARGV[2])
end
return out
"""

HEARTBEAT = """
-- KEYS: nodes zset, node info   ARGV: node, ttl_ms, info  ->  {now_ms, live nodes...}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
local out = {now}
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do out[#out + 1] = node end
return out
"""

LEAVE = """
-- KEYS: nodes zset, node info   ARGV: node
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


class Script:
    """One Lua script, called by SHA; loaded on first NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add the call to a pipeline, with its source (EVAL, so never NOSCRIPT).

        A NOSCRIPT in the middle of a pipeline would leave a hole that the retry
        fills after later entries of the same partition: order would break.
        """
        pipe.eval(self.source, len(keys), *keys, *args)


acquire = Script(ACQUIRE)
renew = Script(RENEW)
release = Script(RELEASE)
settle = Script(SETTLE)
read = Script(READ)
reply = Script(REPLY)
produce = Script(PRODUCE)
heartbeat = Script(HEARTBEAT)
leave = Script(LEAVE)
ALL = (acquire, renew, release, settle, read, reply, produce, heartbeat, leave)


async def load_all(client: Redis) -> None:
    """SCRIPT LOAD every script (after a connect: a restarted Redis forgot them)."""
    pipe = client.pipeline(transaction=False)
    for script in ALL:
        pipe.script_load(script.source)
    await pipe.execute()
