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

Time comes from the server (``TIME``) so instances' clocks never matter. Scripts
name their keys from the prefix and the call key they are given (fewer arguments to
send on every notification); the store therefore needs one Redis server (or a
primary with replicas), not a Redis Cluster.
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


_PRELUDE = """
local p = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

INGEST = Script(
    "ingest",
    _PRELUDE
    + """
-- ARGV: prefix, call key, digest ('' to leave repeats to the sequencer), entry,
--       dedupe window (ms), broadcast (0/1),
--       events max length, token, lease (ms) or '' to leave the call to others, read batch
local call = ARGV[2]
local seen, inbox, lease = p .. 'seen:' .. call, p .. 'inbox:' .. call, p .. 'lease:' .. call
if ARGV[3] ~= '' then
  if redis.call('ZADD', seen, 'NX', now, ARGV[3]) == 0 then
    return {0}
  end
  local window = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - window)
  redis.call('PEXPIRE', seen, window)
end
local id = redis.call('XADD', inbox, '*', 'e', ARGV[4])
redis.call('SADD', p .. 'pending', call)
if ARGV[6] == '1' then
  redis.call('XADD', p .. 'events', 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[4])
end
local owner = redis.call('GET', lease)
if owner then
  if owner == ARGV[8] then
    return {1, 1, id}
  end
  return {1, 0, id}
end
if ARGV[9] ~= '' then
  redis.call('SET', lease, ARGV[8], 'PX', ARGV[9])
  local record = redis.call('GET', p .. 'call:' .. call) or ''
  return {1, 2, id, record, redis.call('XRANGE', inbox, '-', '+', 'COUNT', ARGV[10])}
end
redis.call('ZADD', p .. 'runnable', 'NX', now, call)
return {1, 0, id}
""",
)
"""Accept one notification: drop an exact repeat ({0}); else append it (its id is the
third answer) and say who runs the call: another instance ({1, 0, id}), this one already
({1, 1, id}), or this one from now on, with the call's record and first inbox entries
({1, 2, id, record, entries}). A call nobody runs and this instance cannot take is made
runnable for the others."""

CLAIM = Script(
    "claim",
    _PRELUDE
    + """
-- ARGV: prefix, token, lease (ms), how many more to pop, read batch, calls already popped...
local calls = {}
for i = 6, #ARGV do
  calls[#calls + 1] = ARGV[i]
end
local more = tonumber(ARGV[4])
if more > 0 then
  local popped = redis.call('ZPOPMIN', p .. 'runnable', more)
  for i = 1, #popped, 2 do
    calls[#calls + 1] = popped[i]
  end
end
local claimed = {}
for _, call in ipairs(calls) do
  if redis.call('SET', p .. 'lease:' .. call, ARGV[2], 'NX', 'PX', ARGV[3]) then
    local record = redis.call('GET', p .. 'call:' .. call) or ''
    local entries = redis.call('XRANGE', p .. 'inbox:' .. call, '-', '+', 'COUNT', ARGV[5])
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
    _PRELUDE
    + """
-- ARGV: prefix, call key, token, first id to keep, record ('' keeps the stored one),
--       ended (0/1), grace (ms), lease (ms), record lifetime while active (ms),
--       then release or read on (0/1), read batch
local call = ARGV[2]
local lease, inbox, record = p .. 'lease:' .. call, p .. 'inbox:' .. call, p .. 'call:' .. call
if redis.call('GET', lease) ~= ARGV[3] then
  return {0}
end
redis.call('XTRIM', inbox, 'MINID', ARGV[4])
if ARGV[5] ~= '' then
  if ARGV[6] == '1' then
    redis.call('SET', record, ARGV[5], 'PX', ARGV[7])
    redis.call('SREM', p .. 'active', call)
    redis.call('PEXPIRE', inbox, ARGV[7])
  else
    redis.call('SET', record, ARGV[5], 'PX', ARGV[9])
    redis.call('SADD', p .. 'active', call)
  end
end
if ARGV[10] ~= '1' then
  redis.call('PEXPIRE', lease, ARGV[8])
  return {1, 0}
end
if redis.call('XLEN', inbox) == 0 then
  redis.call('DEL', lease)
  redis.call('SREM', p .. 'pending', call)
  return {1, 1}
end
redis.call('PEXPIRE', lease, ARGV[8])
return {1, 0, redis.call('XRANGE', inbox, '-', '+', 'COUNT', ARGV[11])}
""",
)
"""Acknowledge a call's entries up to one, with the record as it stands after them; then
give the call up if nothing else waits ({1, 1}), or read what does ({1, 0, entries}).
Fenced by the lease: an instance that lost its lease acknowledges nothing ({0})."""

RELEASE = Script(
    "release",
    _PRELUDE
    + """
-- ARGV: prefix, call key, token, hand over (0/1)
local call = ARGV[2]
local lease, inbox = p .. 'lease:' .. call, p .. 'inbox:' .. call
if redis.call('GET', lease) ~= ARGV[3] then
  return -1
end
local left = redis.call('XLEN', inbox)
if left > 0 and ARGV[4] ~= '1' then
  return 0
end
redis.call('DEL', lease)
if left > 0 then
  redis.call('ZADD', p .. 'runnable', 'NX', now, call)
else
  redis.call('SREM', p .. 'pending', call)
end
return 1
""",
)
"""Give a call up: only when its inbox is empty (0 = entries arrived, go on; -1 = not
ours), or, handing it over, always (the call is made runnable for another instance)."""

RENEW = Script(
    "renew",
    _PRELUDE
    + """
-- ARGV: prefix, token, lease (ms), call keys...
local renewed = {}
for i = 4, #ARGV do
  local lease = p .. 'lease:' .. ARGV[i]
  if redis.call('GET', lease) == ARGV[2] then
    redis.call('PEXPIRE', lease, ARGV[3])
    renewed[#renewed + 1] = 1
  else
    renewed[#renewed + 1] = 0
  end
end
return renewed
""",
)
"""Extend this instance's leases; 0 for each one it no longer holds."""

REAP = Script(
    "reap",
    _PRELUDE
    + """
-- ARGV: prefix, cursor, count
local scan = redis.call('SSCAN', p .. 'pending', ARGV[2], 'COUNT', ARGV[3])
local woken = 0
for _, call in ipairs(scan[2]) do
  if redis.call('EXISTS', p .. 'lease:' .. call) == 0 then
    if redis.call('XLEN', p .. 'inbox:' .. call) > 0 then
      woken = woken + redis.call('ZADD', p .. 'runnable', 'NX', now, call)
    else
      redis.call('SREM', p .. 'pending', call)
    end
  end
end
return {scan[1], woken}
""",
)
"""Make calls with entries and no live lease runnable again (their owner crashed)."""

ALL = (INGEST, CLAIM, CHECKPOINT, RELEASE, RENEW, REAP)
