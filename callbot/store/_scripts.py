"""The Lua scripts of the Redis store: each step that must not interleave runs in one.

Keys of one call (``{p}`` is the store's prefix, ``{call}`` the call key):

* ``{p}inbox:{call}``  stream: the call's accepted notifications not yet acknowledged
* ``{p}seen:{call}``   sorted set: digests of its recent notifications (score: when)
* ``{p}lease:{call}``  string: the token of the instance running the call (SET NX PX)
* ``{p}call:{call}``   string: the call's record (JSON, see ``_codec``)

Keys shared by every call:

* ``{p}runnable``  sorted set: calls with work and no owner, oldest first
* ``{p}pending``   set: calls whose inbox may hold entries (scanned by the reaper)
* ``{p}active``    set: calls that have not ended (read back on start)
* ``{p}events``    stream: operation outcomes and call ends, read by every instance
* ``{p}reaper``    string: which instance reaps this round (SET NX PX)

Time comes from the server (``TIME``) so instances' clocks never matter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["ALL", "CHECKPOINT", "CLAIM", "INGEST", "REAP", "RELEASE", "RENEW", "Script"]


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

INGEST = Script(
    "ingest",
    _NOW
    + """
-- KEYS: seen, inbox, lease, runnable, pending, events
-- ARGV: digest, entry, call key, dedupe window (ms), broadcast (0/1), events max length
if redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1]) == 0 then
  return 0
end
local window = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('PEXPIRE', KEYS[1], window)
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
redis.call('SADD', KEYS[5], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZADD', KEYS[4], 'NX', now, ARGV[3])
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[2])
end
return 1
""",
)
"""Accept one notification: drop an exact repeat, else append it and wake the call if unowned."""

CLAIM = Script(
    "claim",
    """
-- KEYS: runnable
-- ARGV: token, lease (ms), key prefix, how many more to pop, read batch, calls already popped...
local calls = {}
for i = 6, #ARGV do
  calls[#calls + 1] = ARGV[i]
end
local more = tonumber(ARGV[4])
if more > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], more)
  for i = 1, #popped, 2 do
    calls[#calls + 1] = popped[i]
  end
end
local claimed = {}
for _, call in ipairs(calls) do
  if redis.call('SET', ARGV[3] .. 'lease:' .. call, ARGV[1], 'NX', 'PX', ARGV[2]) then
    local record = redis.call('GET', ARGV[3] .. 'call:' .. call) or ''
    local entries = redis.call('XRANGE', ARGV[3] .. 'inbox:' .. call, '-', '+', 'COUNT', ARGV[5])
    claimed[#claimed + 1] = {call, record, entries}
  end
end
return claimed
""",
)
"""Take runnable calls: lease each (SET NX PX), with its record and first inbox entries.

A call someone else leased meanwhile is skipped: its owner sees the new entries."""

CHECKPOINT = Script(
    "checkpoint",
    """
-- KEYS: lease, record, inbox, active, pending
-- ARGV: token, first id to keep, record ('' keeps the stored one), ended (0/1),
--       grace (ms), call key, lease (ms), record lifetime while active (ms),
--       then release or read on (0/1), read batch
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[2])
if ARGV[3] ~= '' then
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[5])
    redis.call('SREM', KEYS[4], ARGV[6])
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
  else
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[8])
    redis.call('SADD', KEYS[4], ARGV[6])
  end
end
if ARGV[9] ~= '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  return {1, 0}
end
if redis.call('XLEN', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[5], ARGV[6])
  return {1, 1}
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {1, 0, redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', ARGV[10])}
""",
)
"""Acknowledge a call's entries up to one, with the record as it stands after them; then
give the call up if nothing else waits, or read what does. Fenced by the lease: an
instance that lost its lease acknowledges nothing ({0})."""

RELEASE = Script(
    "release",
    _NOW
    + """
-- KEYS: lease, inbox, pending, runnable
-- ARGV: token, call key, hand over (0/1)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local left = redis.call('XLEN', KEYS[2])
if left > 0 and ARGV[3] ~= '1' then
  return 0
end
redis.call('DEL', KEYS[1])
if left > 0 then
  redis.call('ZADD', KEYS[4], 'NX', now, ARGV[2])
else
  redis.call('SREM', KEYS[3], ARGV[2])
end
return 1
""",
)
"""Give a call up: only when its inbox is empty (0 = entries arrived, go on; -1 = not ours),
or, handing it over, always (the call is made runnable for another instance)."""

RENEW = Script(
    "renew",
    """
-- KEYS: leases; ARGV: token, lease (ms)
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
""",
)
"""Extend this instance's leases; 0 for each one it no longer holds."""

REAP = Script(
    "reap",
    _NOW
    + """
-- KEYS: pending, runnable; ARGV: cursor, key prefix, count
local scan = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[3])
local woken = 0
for _, call in ipairs(scan[2]) do
  if redis.call('EXISTS', ARGV[2] .. 'lease:' .. call) == 0 then
    if redis.call('XLEN', ARGV[2] .. 'inbox:' .. call) > 0 then
      woken = woken + redis.call('ZADD', KEYS[2], 'NX', now, call)
    else
      redis.call('SREM', KEYS[1], call)
    end
  end
end
return {scan[1], woken}
""",
)
"""Make calls with entries and no live lease runnable again (their owner crashed)."""

ALL = (INGEST, CLAIM, CHECKPOINT, RELEASE, RENEW, REAP)
