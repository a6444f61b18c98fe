"""The Lua scripts of the Redis store: each step that must not interleave runs in one.

Every script touches the keys of one call only, all named with the call key as
their hash tag (``{p}{call}:inbox`` ...), so that on a Redis Cluster they share
one slot. Keys of one call (``{p}`` is the store's prefix):

* ``inbox``  stream: the call's accepted notifications not yet acknowledged
* ``seen``   sorted set: digests of its recent notifications (score: when, in 1/1024
  ms, so that those of one millisecond keep their order), as many of the newest of
  the dedupe window as the sequencer recognises repeats among
* ``lease``  string: ``{token}/{epoch}`` of the run holding the call (SET NX PX)
* ``fence``  hash: ``n``, the epoch (raised on every acquisition of the lease, to at
  least the server's clock in milliseconds, so that it grows even after Redis lost it);
  ``fed``, the last entry id an owner may have handed to its handlers; ``r``, the last
  epoch whose run gave the call up; ``v``, the last epoch whose lease was taken back
  after it expired; ``b``, what the inbox's entries take in bytes (the call's backlog);
  ``i``, the entry of the call's new incoming call (it waits to be answered while that
  entry is in the inbox, unacknowledged); ``c``, ``{epoch}/{fed}`` of the last acquisition,
  by INGEST or CLAIM (its epoch and the ``fed`` mark before it: answered again to a CLAIM
  asked again by an instance whose ingest's or claim's answer was lost)
* ``call``   string: the call's record (JSON, see ``_codec``)
* ``journal`` hash: outcomes of Graph actions of handler runs, by entry and step
  (see ``callbot._journal``)
* ``keeper`` string: the token of the instance that keeps the call alive (SET PX, see
  ``KEEP``); unlike ``lease``, held for as long as the call goes on, quiet or not

Each of them has a TTL. Indexes shared by every call live in slots of their own and
are written by the store next to the scripts of a call, never inside them (see
``_redis``). Two of them share a slot, and two scripts of their own: ``pending`` (a
set: calls whose inbox may hold entries, where the reaper looks) and ``unpending`` (a
hash: calls taken off ``pending`` and not looked at again yet, with a generation).
``runnable`` (a sorted set: calls waiting with nobody on them) and ``ringing`` (the same,
for those of them whose incoming call waits to be answered, in the same slot) are written
by WAKE (a full instance takes from ``ringing`` by OVERDUE), and the ``reaper`` (a string:
which instance reaps this round) by TURN when Redis is full.

Time comes from the server (``TIME``, stream ids), so instances' clocks never matter.

Memory: at ``maxmemory`` (``noeviction``) Redis refuses a script's first write that may
add memory. That is how a full Redis turns new work away: INGEST, which keeps a
notification, is refused, the callback gets 503 and Graph sends it again. Every other
script that writes starts with ``#!lua flags=allow-oom`` (:data:`WHEN_FULL`, Redis 7) and
runs whatever the memory: it runs work already accepted (CLAIM, MARK, CHECKPOINT,
RECORD), keeps a run or a call going (RENEW, KEEP), lets a call go (RELEASE, UNPEND,
SETTLE) or hands it to another instance (WAKE, OVERDUE, and TURN for the reaper that wakes
the calls of an instance lost). What it adds is small and bounded by what is stored already
(a lease, a mark, the outcome of an action a handler sent, a call made runnable), and
running the accepted entries is what frees memory: their checkpoint trims the inbox.
Refused, they would keep the backlog stored exactly when Redis needs room. PROBE writes
nothing: it runs anyway. (A script with the flag may touch keys of one Cluster slot only:
those of one call, or ``pending`` and ``unpending``, or ``runnable`` and ``ringing``, or
``reaper``, are.)

Fencing: a run holds the lease value ``{token}/{epoch}``; a checkpoint, renewal or
release is accepted only while the lease is that value, or while nobody holds the
lease and the epoch is still the run's (nobody acquired the call since: the lease
only expired, as when Redis was paused or the owner was cut off for a while).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    *("ALL", "CHECKPOINT", "CLAIM", "INGEST", "KEEP", "MARK", "PROBE", "RECORD", "RELEASE"),
    *("OVERDUE", "RENEW", "SETTLE", "TURN", "UNPEND", "WAKE"),
    "WHEN_FULL",
    "Script",
]


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    @property
    def runs_when_full(self) -> bool:
        """Whether Redis runs it at ``maxmemory`` (see :data:`WHEN_FULL`)."""
        return self.source.startswith(WHEN_FULL)


WHEN_FULL = "#!lua flags=allow-oom\n"
"""The first line of a script Redis runs at ``maxmemory``, its writes that may add memory
included: one that only carries on with what is stored (see the module's docstring)."""


_HELPERS = """
local function later(a, b)
  -- stream id a > stream id b ('' is before everything)
  if b == false or b == '' then return a ~= '' end
  if a == '' then return false end
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) > tonumber(bs)
end
local function mark(fence, id)
  if id ~= '' and later(id, redis.call('HGET', fence, 'fed')) then
    redis.call('HSET', fence, 'fed', id)
  end
end
local function holds(lease, fence, mine, epoch, lease_ms)
  local current = redis.call('GET', lease)
  if current == mine then return true end
  if current == false and redis.call('HGET', fence, 'n') == epoch
      and redis.call('HGET', fence, 'r') ~= epoch then
    -- only expired: nobody took the call since, the run may go on (unless it gave it up:
    -- a renewal overtaken by the release must not bring the lease back). Noted: the
    -- reaper may have taken the call off the pending index meanwhile.
    redis.call('SET', lease, mine, 'PX', lease_ms)
    redis.call('HSET', fence, 'v', epoch)
    return true
  end
  return false
end
local function ringing(inbox, fence)
  -- 1 while the call's new incoming call waits, unacknowledged: Graph drops it unanswered
  -- after 15 s, so any instance takes the call whatever its room, as the ingest does
  local id = redis.call('HGET', fence, 'i')
  if id and #redis.call('XRANGE', inbox, id, id) > 0 then return 1 end
  return 0
end
local function give_up(lease, fence, epoch)
  redis.call('DEL', lease)
  redis.call('HSET', fence, 'r', epoch)
end
local function gave_up(lease, fence, epoch)
  -- the run gave the call up already: this is a retry whose first answer was lost
  return redis.call('EXISTS', lease) == 0 and redis.call('HGET', fence, 'n') == epoch
    and redis.call('HGET', fence, 'r') == epoch
end
local function acquire(inbox, lease, fence, record, token, lease_ms, batch, ttl)
  -- past every earlier epoch even when Redis lost the fence (a restart without
  -- persistence, a failover): at least the server's clock in milliseconds (below 10^14,
  -- which Lua writes out in full: older trees concatenate the number)
  local now = redis.call('TIME')
  local epoch = string.format('%.0f', math.max(
    (tonumber(redis.call('HGET', fence, 'n')) or 0) + 1,
    tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
  redis.call('HSET', fence, 'n', epoch)
  redis.call('SET', lease, token .. '/' .. epoch, 'PX', lease_ms)
  redis.call('PEXPIRE', fence, ttl)
  local fed = redis.call('HGET', fence, 'fed') or ''
  -- what an ask whose answer was lost is answered again (see CLAIM)
  redis.call('HSET', fence, 'c', epoch .. '/' .. fed)
  local entries = redis.call('XRANGE', inbox, '-', '+', 'COUNT', batch)
  if #entries > 0 then mark(fence, entries[1][1]) end
  return {epoch, redis.call('GET', record) or '', entries, fed}
end
"""

INGEST = Script(
    "ingest",
    _HELPERS
    + """
-- KEYS: inbox, seen, lease, fence, record, tenant
-- ARGV: digest ('' leaves repeats to the sequencer), entry, dedupe window (ms),
--       token, lease (ms) or '' to leave the call to others, read batch, lifetime (ms),
--       the tenant the request's token proves (its tenant_key) or '', digests kept,
--       the tenant a call the bot placed was placed in (its tenant_key) or '',
--       the most entries and bytes the inbox may hold before one more is refused
--       ('' '': no bound, for a fact of the bot's own), 1 if it is a new incoming call
--       (0 if a state past it: the call no longer waits to be answered)
local inbox, seen, lease, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local digest, token = ARGV[1], ARGV[4]
local fresh, id, before = 1, '', ''
if ARGV[8] ~= '' then
  -- a call belongs to the tenant it was first seen with
  local bound = redis.call('GET', KEYS[6])
  if bound and bound ~= ARGV[8] then return {-1} end
  redis.call('SET', KEYS[6], ARGV[8], 'PX', ARGV[7])
end
if ARGV[10] ~= '' then
  -- seen first with the tenant it was placed in, unless a notification came before
  redis.call('SET', KEYS[6], ARGV[10], 'PX', ARGV[7], 'NX')
end
if digest ~= '' and redis.call('ZSCORE', seen, digest) then
  fresh = 0
else
  local waiting = redis.call('XLEN', inbox)
  -- an empty inbox holds no bytes, whatever an expired one left counted
  local size = waiting > 0 and tonumber(redis.call('HGET', fence, 'b')) or 0
  local most, most_bytes = tonumber(ARGV[11] or ''), tonumber(ARGV[12] or '')
  if most and (waiting >= most or size >= most_bytes) then
    -- the call's backlog is full: refused before anything of it is kept
    return {-2}
  end
  local last = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)
  if #last > 0 then before = last[1][1] end
  -- appended first: a repeat is only ever recognised once its first copy is kept
  id = redis.call('XADD', inbox, '*', 'e', ARGV[2])
  redis.call('PEXPIRE', inbox, ARGV[7])
  redis.call('HSET', fence, 'b', size + #ARGV[2])
  if ARGV[13] == '1' then
    redis.call('HSET', fence, 'i', id)  -- to be answered: see ringing()
  elseif ARGV[13] == '0' then
    redis.call('HDEL', fence, 'i')  -- answered, or over: it no longer rings
  end
  redis.call('PEXPIRE', fence, ARGV[7])
  if digest ~= '' then
    -- scored in the order appended, within a millisecond too (exact below 2^53): the
    -- newest are kept, not those whose digests sort last
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    local now = tonumber(ms) * 1024 + math.min(tonumber(seq), 1023)
    local window = tonumber(ARGV[3])
    redis.call('ZADD', seen, now, digest)
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - window * 1024)
    -- and the newest only, as many as the sequencer's: a repeat of an older one is news in
    -- memory too, and a flood of distinct notifications cannot grow it for ever
    redis.call('ZREMRANGEBYRANK', seen, 0, -1 - tonumber(ARGV[9]))
    redis.call('PEXPIRE', seen, window)
  end
end
local owner = redis.call('GET', lease)
if owner then
  if string.sub(owner, 1, #token + 1) == token .. '/' then
    -- the owner is handed it at once: noted as fed now, spared a MARK of its own
    mark(fence, id)
    local revived = redis.call('HGET', fence, 'v') == string.match(owner, '/(%d+)$') and 1 or 0
    return {fresh, 1, id, before, owner, revived}
  end
  return {fresh, 0, id}
end
local first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)
if #first == 0 then
  return {fresh, 0, id}
end
if ARGV[5] ~= '' then
  local taken = acquire(inbox, lease, fence, KEYS[5], token, ARGV[5], ARGV[6], ARGV[7])
  return {fresh, 2, id, taken[1], taken[2], taken[3], taken[4]}
end
return {fresh, 3, id, first[1][1], ringing(inbox, fence)}
""",
)
"""Accept one notification: refuse it (``-1``) if its call was first seen with another
tenant (a call the bot placed: the tenant it was placed in, when the fact of its placing
came before any notification of it), or (``-2``) if it is new and the call's inbox holds
as many entries or bytes as it may (``callbot._sequencing.MAX_BACKLOG_ENTRIES``,
``MAX_BACKLOG_BYTES``), else append it unless it repeats one kept in the
dedupe window (``fresh`` 1 or 0, and its entry id), and say who runs the call:
another instance (0),
this one already (1, with the id of the entry before it, if any, the lease, and 1 if
that lease was taken back after it expired; the entry is noted as fed, since the run
holding that lease is handed it with the answer),
this one from now on
(2, with the epoch, the record, the first entries and the previous ``fed`` mark, kept in
``fence.c`` for a CLAIM asked again should this answer be lost), or
nobody (3, with the oldest entry id and whether the call's incoming call waits to be
answered: the store makes the call runnable). A new incoming call's entry is noted in
``fence.i``, and forgotten with a later state of the call (answered, redirected, ended)."""

CLAIM = Script(
    "claim",
    WHEN_FULL
    + _HELPERS
    + """
-- KEYS: inbox, lease, fence, record
-- ARGV: token, lease (ms), read batch, lifetime (ms), 1 to take it only while its
--       incoming call waits to be answered, 1 if asked again (the answer was lost)
if ARGV[6] == '1' then
  -- the lease an earlier ask took (this one's, or an ingest's) is this instance's:
  -- answered again, as it was
  local claimed = redis.call('HGET', KEYS[3], 'c')
  if claimed and redis.call('GET', KEYS[2]) == ARGV[1] .. '/' .. string.match(claimed, '^%d+') then
    local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])
    return {string.match(claimed, '^%d+'), redis.call('GET', KEYS[4]) or '', entries,
      string.match(claimed, '^%d+/(.*)$'), 1}
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('XLEN', KEYS[1]) == 0 then
  return {}
end
if ARGV[5] == '1' and ringing(KEYS[1], KEYS[3]) == 0 then
  return {}
end
return acquire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
""",
)
"""Take a runnable call: a new epoch and lease, the record, the first entries and the
previous ``fed`` mark; ``{}`` when someone holds it or nothing waits (or, asked so, when
its incoming call no longer waits to be answered). Asked again after its answer was lost
(``ARGV[6]``), the same answer while the lease that ask took holds (entries as they are
now, and a fifth value, 1: nothing was taken by this answer, and the lease it names may be
given up by the time it is read), else taken as the first time: the epoch and previous
``fed`` mark of the call's last acquisition are kept in ``fence.c``. An ingest whose answer
was lost asks so too: the lease INGEST took for this instance is answered the same way."""

CHECKPOINT = Script(
    "checkpoint",
    WHEN_FULL
    + _HELPERS
    + """
-- KEYS: inbox, lease, fence, record, journal
-- ARGV: lease value, epoch, first id to keep, record ('' keeps the stored one),
--       ended (0/1), how long an ended call's keys stay (ms), lease (ms), lifetime (ms),
--       read on (0/1), read batch, last id about to be fed ('' if unknown),
--       give the call up if nothing waits (0/1),
--       journal fields of the acknowledged entries...
local inbox, lease, fence, record = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if ARGV[12] == '1' and gave_up(lease, fence, ARGV[2]) then
  return {2}
end
if not holds(lease, fence, ARGV[1], ARGV[2], ARGV[7]) then
  return {0}
end
-- what the acknowledged entries took leaves the call's backlog with them
local gone = 0
for _, entry in ipairs(redis.call('XRANGE', inbox, '-', '(' .. ARGV[3])) do
  gone = gone + #entry[2][2]
end
redis.call('XTRIM', inbox, 'MINID', ARGV[3])
if gone > 0 and redis.call('HINCRBY', fence, 'b', -gone) < 0 then
  redis.call('HSET', fence, 'b', 0)  -- entries kept before the count began
end
local life = ARGV[8]
if ARGV[5] == '1' then
  life = ARGV[6]
end
if ARGV[4] ~= '' then
  redis.call('SET', record, ARGV[4], 'PX', life)
end
redis.call('PEXPIRE', inbox, life)
redis.call('PEXPIRE', fence, life)
mark(fence, ARGV[11])
for i = 13, #ARGV do
  redis.call('HDEL', KEYS[5], ARGV[i])
end
if ARGV[9] ~= '1' then
  redis.call('PEXPIRE', lease, ARGV[7])
  return {1}
end
local entries = redis.call('XRANGE', inbox, '-', '+', 'COUNT', ARGV[10])
if #entries == 0 and ARGV[12] == '1' then
  give_up(lease, fence, ARGV[2])
  return {2}
end
redis.call('PEXPIRE', lease, ARGV[7])
if ARGV[11] == '' and #entries > 0 then mark(fence, entries[1][1]) end
return {1, entries}
""",
)
"""Acknowledge a call's entries up to one, with the record as it stands after them, and
read what waits after them ({1, entries}) if asked; asked to, give the call up when
nothing waits ({2}). Fenced: a run that lost its lease acknowledges nothing ({0})."""

MARK = Script(
    "mark",
    WHEN_FULL
    + _HELPERS
    + """
-- KEYS: lease, fence;  ARGV: lease value, epoch, lease (ms), entry id
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then
  return 0
end
mark(KEYS[2], ARGV[4])
return 1
""",
)
"""Note that the run is about to hand entries up to one to its handlers (0: not ours)."""

RELEASE = Script(
    "release",
    WHEN_FULL
    + _HELPERS
    + """
-- KEYS: inbox, lease, fence;  ARGV: lease value, epoch, lease (ms), hand over (0/1),
--       the last entry handed to handlers, to note as fed instead ('' or none: kept)
local again = gave_up(KEYS[2], KEYS[3], ARGV[2])
if not again and not holds(KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3]) then
  return {-1}
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first > 0 and ARGV[4] ~= '1' and not again then
  return {0}
end
if ARGV[5] and ARGV[5] ~= '' then
  -- entries noted as fed on their way in, but left unrun: not re-runs for the next owner
  redis.call('HSET', KEYS[3], 'fed', ARGV[5])
end
give_up(KEYS[2], KEYS[3], ARGV[2])
if #first > 0 then
  return {2, first[1][1], ringing(KEYS[1], KEYS[3])}
end
return {1}
""",
)
"""Give a call up: only when its inbox is empty ({1}; {0}: entries arrived, go on; {-1}:
not ours), or, handing it over, always ({2, oldest id, 1 if its incoming call waits to be
answered}: the store makes it runnable).
A run that stops with nothing of the call running names the last entry handed to
handlers, so that the ``fed`` mark no longer covers entries it was told of and never ran."""

RENEW = Script(
    "renew",
    WHEN_FULL
    + _HELPERS
    + """
-- KEYS: lease, fence;  ARGV: lease value, epoch, lease (ms)
if holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
""",
)
"""Extend a run's lease; 0 when it no longer holds it."""

PROBE = Script(
    "probe",
    _HELPERS
    + """
-- KEYS: inbox, lease, fence
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {2}
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first > 0 then
  return {1, first[1][1], ringing(KEYS[1], KEYS[3])}
end
return {0}
""",
)
"""What the reaper needs of a call: leased (2), waiting with nobody on it (1, oldest
id, 1 if its incoming call waits to be answered), or idle (0)."""

RECORD = Script(
    "record",
    WHEN_FULL
    + """
-- KEYS: fence, journal;  ARGV: epoch, field, outcome, lifetime (ms)
if redis.call('HGET', KEYS[1], 'n') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""",
)
"""Keep the outcome of a handler's Graph action, unless its run's epoch is over (0)."""

UNPEND = Script(
    "unpend",
    WHEN_FULL
    + """
-- KEYS: pending, unpending;  ARGV: call, generation (never used before)
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
""",
)
"""Take a call off the pending index, into ``unpending`` (with the generation of that
move) until it is looked at again; 0 when it was not indexed."""

SETTLE = Script(
    "settle",
    WHEN_FULL
    + """
-- KEYS: pending, unpending;  ARGV: call, generation, back (0/1), call, generation, ...
for i = 1, #ARGV, 3 do
  if ARGV[i + 2] == '1' then
    redis.call('SADD', KEYS[1], ARGV[i])
  end
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
return 0
""",
)
"""Calls looked at again after they were taken off the pending index: indexed again
when work came back (``back``); out of ``unpending`` unless taken off again since."""

KEEP = Script(
    "keep",
    WHEN_FULL
    + """
-- KEYS: keeper;  ARGV: this instance's token, lease (ms; '' gives the lease up)
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder ~= false and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""",
)
"""Take or renew the lease on keeping a call alive: 1 while this instance holds it, 0 when
another does (or, giving it up, always)."""

WAKE = Script(
    "wake",
    WHEN_FULL
    + """
-- KEYS: runnable, ringing
-- ARGV: score (the oldest waiting entry's ms), call, 1 if its incoming call waits to be
--       answered, score, call, ...
local woken = 0
for i = 1, #ARGV, 3 do
  woken = woken + redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] == '1' then
    redis.call('ZADD', KEYS[2], 'NX', ARGV[i], ARGV[i + 1])
  end
end
return woken
""",
)
"""Make calls runnable for whichever instance takes them (a call there already keeps its
place); how many were not there. A call whose incoming call waits to be answered is also
put in ``ringing``, which every instance not draining takes from whatever its room (an
earlier release, which knows only ``runnable``, finds it there). Runs when Redis is full:
a call handed over by an instance that stopped, or found by the reaper, waits for no
room."""

OVERDUE = Script(
    "overdue",
    WHEN_FULL
    + """
-- KEYS: ringing;  ARGV: how long a call rings before it is given to any instance (ms)
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', due),
  'LIMIT', 0, 1)
if #first == 0 then
  return false
end
redis.call('ZREM', KEYS[1], first[1])
return first[1]
""",
)
"""Take the call ringing longest off ``ringing`` if its score (its oldest waiting entry, by
the server's clock) is older than the grace given; nil if none is. For an instance with no
room: one with room waits in ``BZPOPMIN ringing`` and goes first."""

TURN = Script(
    "turn",
    WHEN_FULL
    + """
-- KEYS: reaper;  ARGV: this instance's token, how long the turn lasts (ms)
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
""",
)
"""Take the reaper's turn for a round (1), unless another instance has it (0): the plain
``SET`` the store takes it by otherwise, which Redis refuses when full."""

ALL = (
    *(INGEST, CLAIM, CHECKPOINT, MARK, RELEASE, RENEW, PROBE, RECORD, UNPEND, SETTLE, KEEP),
    *(WAKE, OVERDUE, TURN),
)
