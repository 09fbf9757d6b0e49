"""Lua scripts of the Redis transport; each touches one stream's keys (one cluster slot).

KEYS are always: 1 = metadata hash, 2 = events stream, 3 = lease string.
Metadata fields: epoch, status, owner, lease_ms, created, updated (ms), last (seq of the
last entry), count (events in it), cancel ("1" once requested).
"""

# The epoch is the server's clock in microseconds (never the same for two runs of an id,
# even one deleted and re-created at once), and always above the previous epoch.
# ARGV: owner, lease_ms, now_ms, metadata running_ttl_ms (the data key gets its expiry
#       with the first entry)
CREATE = """
redis.replicate_commands()
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch')
if m[1] == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local now = redis.call('TIME')
local epoch = tonumber(now[1]) * 1000000 + tonumber(now[2])
if m[2] and tonumber(m[2]) >= epoch then epoch = tonumber(m[2]) + 1 end
epoch = string.format('%.0f', epoch)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', epoch, 'status', 'running', 'owner', ARGV[1],
  'lease_ms', ARGV[2], 'created', ARGV[3], 'updated', ARGV[3], 'last', 0, 'count', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return epoch
"""

# Returns 1 (written), 0 (already stored), -1 (lease lost) or {-2, last} when seq is past
# last + 1: the storage lost acknowledged entries (StorageRollback).
# ARGV: owner, epoch, seq, payload, count, now_ms, final status or '',
#       then the transport's constants: max_entries, running_ttl_ms, retention_ms,
#       metadata_ttl_ms
APPEND = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'last', 'status')
if m[1] ~= ARGV[1] then return -1 end
if tonumber(m[2]) >= tonumber(ARGV[3]) then return 0 end
if m[3] ~= 'running' then return -1 end
if tonumber(ARGV[3]) > tonumber(m[2]) + 1 then return {-2, m[2]} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], ARGV[2] .. '-' .. ARGV[3], 'e', ARGV[4])
if ARGV[7] == '' then
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[5], 'updated', ARGV[6])
  if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[2], ARGV[9]) end
else
  redis.call('HSET', KEYS[1], 'last', ARGV[3], 'count', ARGV[5], 'updated', ARGV[6],
    'status', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[10])
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  redis.call('DEL', KEYS[3])
end
return 1
"""

# ARGV: owner, lease_ms, running_ttl_ms, metadata running_ttl_ms (plus the tombstone)
RENEW = """
local m = redis.call('HMGET', KEYS[1], 'owner', 'status', 'cancel')
if m[1] ~= ARGV[1] or m[2] ~= 'running' then return -1 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if m[3] then return 1 end
return 0
"""

# ARGV: cancel channel, stream id
CANCEL = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# ARGV: cancel channel, stream id
DELETE = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
"""

# ARGV: epoch, payload, now_ms, max_entries, retention_ms, metadata_ttl_ms
REAP = """
local m = redis.call('HMGET', KEYS[1], 'status', 'epoch', 'last')
if m[1] ~= 'running' or m[2] ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local seq = string.format('%.0f', tonumber(m[3]) + 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], ARGV[1] .. '-' .. seq, 'e', ARGV[2])
redis.call('HSET', KEYS[1], 'last', seq, 'count', 1, 'updated', ARGV[3], 'status', 'error',
  'owner', '')
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
