"""Lua scripts of the Redis transport; each touches one stream's keys (one cluster slot).

KEYS are always: 1 = metadata hash, 2 = events stream, 3 = lease string.
Metadata fields: epoch, status, owner, lease_ms, created, updated (ms), last (seq of the
last entry), count (events in it), cancel ("1" once requested), restored ("1" while a run
made again by its producer waits for its first heartbeat to set lease_ms: see _RESTORE).

A fourth key, in the stream's slot too (``KEYS[1]`` with ``meta`` replaced by ``gone``),
marks a deleted stream (DELETE sets it with an expiry, CREATE removes it): a run whose
keys are all missing was deleted if it is there, else lost by the storage (a failover).

Shard channels, in the stream's slot too (``KEYS[1]`` with ``meta`` replaced by ``n`` or
``c``): ``...:n`` carries a notice per write to the processes following the stream: the
entry id ``<epoch>-<seq>``, then a space and the entry itself when it is at most
NOTICE_PAYLOAD_MAX bytes (larger ones are fetched with ``XRANGE``); an empty notice when
the stream was deleted. ``...:c`` carries the epoch of a run asked to stop.
"""

from .._constants import DEFAULT_LEASE

#: Entries up to this size travel inside their notice (no fetch); larger ones are fetched,
#: which keeps pub/sub output buffers small.
NOTICE_PAYLOAD_MAX = 8192

# The epoch is the server's clock in microseconds (never the same for two runs of an id,
# even one deleted and re-created at once), and always above the previous epoch.
# The first write is the lease's SET: Redis out of memory (maxmemory, noeviction) refuses a
# script's first write if it may use memory, and lets the rest through once it has written
# (it cannot stop halfway). With the DEL first, a run was made that could write nothing.
# ARGV: owner, lease_ms, now_ms, running_ttl_ms, tombstone_ms (the data key gets its
#       expiry with the first entry)
CREATE = """
redis.replicate_commands()
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch')
if m[1] == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local denied = refused(NOTICES)
if denied then return denied end
local now = redis.call('TIME')
local epoch = tonumber(now[1]) * 1000000 + tonumber(now[2])
if m[2] and tonumber(m[2]) >= epoch then epoch = tonumber(m[2]) + 1 end
epoch = string.format('%.0f', epoch)
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2], GONE)
redis.call('HSET', KEYS[1], 'epoch', epoch, 'status', 'running', 'owner', ARGV[1],
  'lease_ms', ARGV[2], 'created', ARGV[3], 'updated', ARGV[3], 'last', 0, 'count', 0)
redis.call('PEXPIRE', KEYS[1], meta_ttl(ARGV[4], ARGV[2], ARGV[5]))
return epoch
"""

# Returns 1 (written), 0 (seq already stored: a retried write), -1 (lease lost) or
# {last seq} (seq past last + 1: nothing written).
# ARGV: owner, epoch, seq, payload, count, now_ms, final status or '',
#       then the transport's constants: max_entries, running_ttl_ms, retention_ms,
#       metadata_ttl_ms, running metadata_ttl_ms
APPEND = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'last', 'status')
if not m[1] then
  local lost = restore(ARGV[1], ARGV[2], ARGV[3], ARGV[9], ARGV[12])
  if lost then return lost end
  m = {ARGV[1], '0', 'running'}
end
if m[1] ~= ARGV[1] then return -1 end
local last = tonumber(m[2])
if last >= tonumber(ARGV[3]) then return 0 end
if m[3] ~= 'running' then return -1 end
-- A seq past last + 1: the storage lost acknowledged entries (a failover to a lagging
-- replica). Write nothing; report where the storage ends (issue 8, part 4).
if tonumber(ARGV[3]) > last + 1 then return {m[2]} end
local made = add_entry(ARGV[3], ARGV[8], ARGV[2] .. '-' .. ARGV[3], ARGV[4])
if ARGV[7] == '' then
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[5], 'updated', ARGV[6])
  if made then redis.call('PEXPIRE', KEYS[2], running_ttl(ARGV[9])) end
else
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[5], 'updated', ARGV[6],
    'status', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[10])
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  redis.call('DEL', KEYS[3])
end
local id = ARGV[2] .. '-' .. ARGV[3]
if #ARGV[4] <= NOTICE_PAYLOAD_MAX then id = id .. ' ' .. ARGV[4] end
redis.call('SPUBLISH', NOTICES, id)
return 1
"""

# The data of a running stream expires no sooner than its lease: a lease longer than
# running_ttl (a reservation's start_timeout) must not see its entries expire under it.
# Returns 1 (a cancel was requested), 0, -1 (lease lost) or 2 (the storage lost the whole
# run: its producer writes it again, see _RESTORE).
# ARGV: owner, lease_ms, running_ttl_ms, tombstone_ms
RENEW = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'status', 'cancel', 'restored')
if not m[1] and redis.call('EXISTS', GONE) == 0 then return 2 end
if m[1] ~= ARGV[1] or m[2] ~= 'running' then return -1 end
if m[4] then
  redis.call('HSET', KEYS[1], 'lease_ms', ARGV[2])
  redis.call('HDEL', KEYS[1], 'restored')
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], meta_ttl(ARGV[3], ARGV[2], ARGV[4]))
redis.call('PEXPIRE', KEYS[2], longer(ARGV[3], ARGV[2]))
if m[3] then return 1 end
return 0
"""

# Returns the epoch of the run asked to stop, or 0 (none running). No ARGV.
CANCEL = """
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch')
if m[1] ~= 'running' then return 0 end
local denied = refused(CANCELS)
if denied then return denied end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('SPUBLISH', CANCELS, m[2])
return m[2]
"""

# Returns {keys deleted, epoch of the run asked to stop or ''}. ARGV: metadata_ttl_ms (the
# marker's expiry: a producer still writing the run meanwhile stays fenced; it is told by
# the cancel notice too). The marker is set also when nothing was there: a run the storage
# lost, deleted before its producer made it again, stays deleted.
DELETE = """
local denied = refused(NOTICES) or refused(CANCELS)
if denied then return denied end
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch')
local stopped = ''
if m[1] == 'running' then
  stopped = m[2]
  redis.call('SPUBLISH', CANCELS, stopped)
end
local deleted = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SET', GONE, '1', 'PX', ARGV[1])
redis.call('SPUBLISH', NOTICES, '')
return {deleted, stopped}
"""

# ARGV: epoch, payload, now_ms, max_entries, retention_ms, metadata_ttl_ms
REAP = """
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'last', 'written')
if m[1] ~= 'running' or m[2] ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local denied = refused(NOTICES)
if denied then return denied end
-- After entries held for replicas (HOLD) if any: they become readable with it.
local seq = string.format('%.0f', math.max(tonumber(m[3]), tonumber(m[4] or 0)) + 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], ARGV[1] .. '-' .. seq, 'e', ARGV[2])
redis.call('HSET', KEYS[1], 'last', seq, 'count', 1, 'updated', ARGV[3], 'status', 'error',
  'owner', '')
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SPUBLISH', NOTICES, ARGV[1] .. '-' .. seq .. ' ' .. ARGV[2])
return 1
"""


# Durable appends (RedisTransport(replicas=N)): HOLD stores the entry without making it
# readable, the transport sends WAIT N on the same connection, then RELEASE makes it
# readable and notifies. Metadata field 'written' is the last seq stored, 'last' the last
# seq readable. HOLD always writes (the 'written' field), so that the WAIT that follows it
# counts this entry even when HOLD is a retry.
# Returns as APPEND. ARGV: owner, epoch, seq, payload, max_entries, running_ttl_ms,
# running metadata_ttl_ms
HOLD = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'written', 'status', 'last')
if not m[1] then
  local lost = restore(ARGV[1], ARGV[2], ARGV[3], ARGV[6], ARGV[7])
  if lost then return lost end
  m = {ARGV[1], '0', 'running', '0'}
end
if m[1] ~= ARGV[1] then return -1 end
local written = tonumber(m[2] or m[4])
if written >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'written', m[2] or m[4])
  return 0
end
if m[3] ~= 'running' then return -1 end
if tonumber(ARGV[3]) > written + 1 then return {string.format('%.0f', written)} end
if add_entry(ARGV[3], ARGV[5], ARGV[2] .. '-' .. ARGV[3], ARGV[4]) then
  redis.call('PEXPIRE', KEYS[2], running_ttl(ARGV[6]))
end
redis.call('HSET', KEYS[1], 'written', ARGV[3])
return 1
"""

# ARGV: owner, epoch, seq, count, now_ms, final status or '', retention_ms, metadata_ttl_ms
RELEASE = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'last', 'status')
if not m[1] and redis.call('EXISTS', GONE) == 0 then return {'0'} end  -- lost: see _RESTORE
if m[1] ~= ARGV[1] then return -1 end
if tonumber(m[2]) >= tonumber(ARGV[3]) then return 0 end
if m[3] ~= 'running' then return -1 end
if ARGV[6] == '' then
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[4], 'updated', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[4], 'updated', ARGV[5],
    'status', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('DEL', KEYS[3])
end
redis.call('SPUBLISH', NOTICES, ARGV[2] .. '-' .. ARGV[3])
return 1
"""

# Reads of a durable transport: only entries released (acknowledged by the replicas).
# ARGV: epoch, after, limit
READ = """
local last = redis.call('HGET', KEYS[1], 'last')
if not last or tonumber(last) <= tonumber(ARGV[2]) then return {} end
return redis.call('XRANGE', KEYS[2], ARGV[1] .. '-' .. string.format('%.0f', ARGV[2] + 1),
  ARGV[1] .. '-' .. last, 'COUNT', ARGV[3])
"""


# Functions put in front of the scripts that call them.
_LONGER = """
local function longer(a, b)  -- the longer of two durations in ms, as given
  if tonumber(a) >= tonumber(b) then return a end
  return b
end
"""

# The expiry of a running stream's metadata: the tombstone after its data's (running_ttl,
# or the lease when longer). (It was the longer of running_ttl + tombstone and the lease: a
# lease past that, a reservation's start_timeout, left no margin, and a late reader of the
# abandoned run got StreamNotFound, not OffsetExpired.)
_META_TTL = """
local function meta_ttl(running_ttl, lease, tombstone)
  return string.format('%.0f', tonumber(longer(running_ttl, lease)) + tonumber(tombstone))
end
"""

# XADD entry seq of the stream; true when that made the key, which then needs its expiry.
# After the first entry, NOMKSTREAM: a key gone under a live run (evicted, or expired
# while its producer stalled) is made again with an expiry, not left without one.
_ADD_ENTRY = """
local function add_entry(seq, max_entries, id, payload)
  if seq ~= '1' and redis.call('XADD', KEYS[2], 'NOMKSTREAM', 'MAXLEN', '~', max_entries,
      id, 'e', payload) then
    return false
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', max_entries, id, 'e', payload)
  return true
end
"""

# The expiry of a running stream's entries key, made by an append: running_ttl, and no
# less than what is left of the lease, as CREATE and RENEW give the metadata. (The key got
# running_ttl alone: with a lease past running_ttl, the first entries expired before the
# first heartbeat renewed them.)
_RUNNING_TTL = """
local function running_ttl(ms)
  return longer(ms, redis.call('PTTL', KEYS[3]))
end
"""

# The run's keys are all missing. DELETE left a marker: the run was deleted, its producer
# is fenced (-1). Else the storage lost the whole run (created on a master that a failover
# demoted before its replica had it): entry 1 makes the run again with the producer's
# epoch (offsets readers hold stay valid) and owner, and returns false (write it); a later
# entry is a rollback to 0 ({'0'}), and the producer writes entries 1.. again from its
# window. The lease key lasts running_ttl and lease_ms is a placeholder until the next
# heartbeat (RENEW) sets both from the producer's lease.
_RESTORE = """
local function restore(owner, epoch, seq, running_ttl, meta_ttl)
  if redis.call('EXISTS', GONE) == 1 then return -1 end
  if seq ~= '1' then return {'0'} end
  local now = redis.call('TIME')
  now = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'status', 'running', 'owner', owner,
    'lease_ms', DEFAULT_LEASE_MS, 'created', now, 'updated', now, 'last', 0, 'count', 0,
    'restored', '1')
  redis.call('PEXPIRE', KEYS[1], meta_ttl)
  redis.call('SET', KEYS[3], owner, 'PX', running_ttl)
  return false
end
"""

# An error reply if the user may not SPUBLISH to the channel, checked before a script
# writes: Redis 7 gives an ACL user no channels by default (acl-pubsub-default), and a
# SPUBLISH refused after the writes left them stored, so the append's retry found its
# entry "already stored" and the refusal was never reported, nor any notice published.
# A run checks once, when it starts (CREATE), not at each append (about 1 µs of Redis
# CPU per call); the rarer writers that publish (CANCEL, DELETE, REAP) check each time.
_REFUSED = """
local function refused(channel)
  if redis.acl_check_cmd('SPUBLISH', channel, '') then return false end
  return redis.error_reply('NOPERM this user has no permissions to publish to ' .. channel
    .. ': grant it the channels of the key prefix (&<prefix>:*)')
end
"""

CREATE, RENEW = _REFUSED + _LONGER + _META_TTL + CREATE, _LONGER + _META_TTL + RENEW
APPEND, HOLD = (_LONGER + _RUNNING_TTL + _ADD_ENTRY + _RESTORE + s for s in (APPEND, HOLD))
CANCEL, DELETE, REAP = (_REFUSED + s for s in (CANCEL, DELETE, REAP))


def _channels(script: str) -> str:
    base = "string.sub(KEYS[1], 1, -5)"  # '<prefix>:{<id>}:' from '<prefix>:{<id>}:meta'
    return (
        script.replace("NOTICES", f"{base} .. 'n'")
        .replace("CANCELS", f"{base} .. 'c'")
        .replace("GONE", f"{base} .. 'gone'")
        .replace("DEFAULT_LEASE_MS", str(int(DEFAULT_LEASE * 1000)))
        .replace("NOTICE_PAYLOAD_MAX", str(NOTICE_PAYLOAD_MAX))
    )


CREATE, APPEND, RENEW, CANCEL, DELETE, REAP, HOLD, RELEASE = map(
    _channels, (CREATE, APPEND, RENEW, CANCEL, DELETE, REAP, HOLD, RELEASE)
)
