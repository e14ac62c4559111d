//! The Lua scripts that change a job in Redis: each runs atomically, so a
//! state change and its queue entry move together, and a guard on the job's
//! status (and owner) keeps a late writer from overwriting a final state.
//!
//! A job is a hash `{prefix}job:{id}` (`status`, `owner`, `entry` plus the
//! stored fields); its model's queue is a stream `{prefix}queue:{model}` read
//! by the consumer group `workers`, one entry (`id`) per queued job. Entries
//! delivered but not acknowledged are the running jobs; an entry is
//! acknowledged and deleted when its job ends, so the stream's length minus
//! its pending count is the number of jobs waiting.

/// Jobs waiting in a model's stream: entries not yet delivered. Prepended
/// to the scripts that count them (`with_waiting`).
const WAITING: &str = r#"
local function waiting(queue, group)
  return redis.call('XLEN', queue) - redis.call('XPENDING', queue, group)[1]
end
"#;

/// `script` with the `waiting(queue, group)` function defined before it.
pub fn with_waiting(script: &str) -> String {
    [WAITING, script].concat()
}

/// KEYS: job, queue. ARGV: group, limit, id, then the hash's field/value
/// pairs. Returns 1, -1 (the id exists) or -2 (the queue is full).
pub const SUBMIT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local waiting = waiting(KEYS[2], ARGV[1])
if waiting >= tonumber(ARGV[2]) then return -2 end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
redis.call('HSET', KEYS[1], 'entry', entry, unpack(ARGV, 4))
return 1
"#;

/// KEYS: job, queue. ARGV: group, entry, owner, now, reclaimed (0/1),
/// takeover limit. Marks the job IN_PROGRESS for `owner`; a reclaimed entry
/// (its worker went silent past the visibility timeout) takes over a running
/// job. Returns 1, 2 (taken over, but its workers died `limit` times running
/// it: the caller fails it), or 0 after dropping an entry whose job ended or
/// was queued again.
pub const CLAIM: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
local current = redis.call('HGET', KEYS[1], 'entry')
if current == ARGV[2] and (status == 'IN_QUEUE' or (status == 'IN_PROGRESS' and ARGV[5] == '1')) then
  redis.call('HSET', KEYS[1], 'status', 'IN_PROGRESS', 'owner', ARGV[3], 'started_at', ARGV[4])
  if status == 'IN_PROGRESS' then
    local takeovers = redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
    redis.call('HINCRBY', KEYS[1], 'retries', 1)
    if takeovers >= tonumber(ARGV[6]) then return 2 end
  end
  return 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 0
"#;

/// KEYS: job, queue. ARGV: group, owner. Resets the entry's idle time while
/// `owner` still runs the job; 0 when the claim is lost.
pub const HEARTBEAT: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
return 1
"#;

/// KEYS: job, queue, counts, result files. ARGV: group, owner ('' = anyone),
/// status, output, error ('' = none), logs, now, expires_at (Unix ms), the
/// output's file on the shared volume ('' = none), the ending's token.
/// Records a final state, drops the queue entry and counts the ending; a
/// result file is listed to be deleted when the job expires. Returns 1, 0
/// (the job had ended or moved on), or 2 when this very ending was already
/// recorded (a retry after a lost reply: nothing changes).
pub const FINISH: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'IN_QUEUE' and status ~= 'IN_PROGRESS' then
  if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[10] then return 2 end
  return 0
end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'logs', ARGV[6], 'completed_at', ARGV[7], 'ended_by', ARGV[10])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'output', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'output_file', ARGV[9])
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[9])
end
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then
  redis.call('XACK', KEYS[2], ARGV[1], entry)
  redis.call('XDEL', KEYS[2], entry)
end
redis.call('PEXPIREAT', KEYS[1], ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
if tonumber(redis.call('HGET', KEYS[1], 'retries') or '0') > 0 then
  redis.call('HINCRBY', KEYS[3], 'retried:' .. ARGV[3], 1)
end
return 1
"#;

/// KEYS: job, queue. ARGV: group, limit, id. FAILED or TIMED_OUT → queued
/// again with a new entry. Returns 1, 0 (another state) or -2 (queue full).
pub const RETRY: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'FAILED' and status ~= 'TIMED_OUT' then return 0 end
local waiting = waiting(KEYS[2], ARGV[1])
if waiting >= tonumber(ARGV[2]) then return -2 end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
redis.call('HDEL', KEYS[1], 'output', 'output_file', 'error', 'started_at', 'completed_at', 'owner', 'ended_by', 'takeovers')
redis.call('HSET', KEYS[1], 'status', 'IN_QUEUE', 'logs', '', 'entry', entry)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('PERSIST', KEYS[1])
return 1
"#;

/// KEYS: job, queue. ARGV: group, owner, id. A running job of `owner` goes
/// back to the end of its queue (graceful shutdown). Returns 1 or 0.
pub const HAND_BACK: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'IN_PROGRESS' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
local old = redis.call('HGET', KEYS[1], 'entry')
if old then
  redis.call('XACK', KEYS[2], ARGV[1], old)
  redis.call('XDEL', KEYS[2], old)
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
redis.call('HDEL', KEYS[1], 'owner', 'started_at')
redis.call('HSET', KEYS[1], 'status', 'IN_QUEUE', 'entry', entry)
return 1
"#;

/// KEYS: job. Deletes it when it has ended. Returns 1 or 0.
pub const DELETE_FINAL: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'IN_QUEUE' or status == 'IN_PROGRESS' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS: queue. ARGV: group. Jobs waiting (entries not yet delivered).
pub const DEPTH: &str = r#"
return waiting(KEYS[1], ARGV[1])
"#;
