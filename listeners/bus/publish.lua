-- Assign the stream's next sequence number, append to its replay log, add to its partition's stream,
-- publish on the partition's shard channel: one atomic step. Every key and the channel carry the
-- partition's hash tag (runbell.bus.keys), so this is one call on Redis Cluster too.
-- KEYS[1] seq counter, KEYS[2] replay log (stream), KEYS[3] event id -> seq, KEYS[4] epoch,
-- KEYS[5] the partition's stream (recorder), capped at about ARGV[6] entries
-- ARGV[1] event id, ARGV[2] event JSON, ARGV[3] TTL in seconds, ARGV[4] shard channel,
-- ARGV[5] window: 0 for a run's stream, which ends: KEYS[3] is a hash and all
--   four keys expire TTL seconds after the last event. N > 0 for an endless stream (an asset's):
--   the log keeps the last N entries, KEYS[3] is a sorted set remembering the ids of the last
--   N seqs, both expire TTL seconds after the last event, and the seq counter and epoch never
--   expire, so a client's Last-Event-ID keeps its meaning however long the asset is quiet.
-- The epoch (runbell.bus.schema) is made when the seq starts at 1 or KEYS[4] is missing: with the
-- stream's first event, or because Redis lost the stream's state (restart without persistence,
-- fail-over, expiry, eviction). It is the
-- server's time in microseconds, 13 hex digits, so epochs sort in the order they were made.
-- ARGV[6] the partition stream's approximate cap, ARGV[7] the route of the live message (keys.live_message)
-- Returns {seq, 1, epoch} for a new event, {seq, 0, epoch} when this event id was already published
-- (then nothing is added: the first call added it to the partition stream in the same step).
local window = tonumber(ARGV[5] or '0') or 0
local epoch = redis.call('GET', KEYS[4])
local known
if window > 0 then
  known = redis.call('ZSCORE', KEYS[3], ARGV[1])
else
  known = redis.call('HGET', KEYS[3], ARGV[1])
end
if known then
  return {tonumber(known), 0, epoch or ''}
end
local seq = redis.call('INCR', KEYS[1])
if seq == 1 or not epoch then -- a sequence starting (again), or state without an epoch (older publishers)
  local now = redis.call('TIME')
  epoch = string.format('%08x%05x', tonumber(now[1]), tonumber(now[2]))
  redis.call('SET', KEYS[4], epoch)
  if seq == 1 then -- what a lost counter left of the log belongs to a dead epoch (XADD 0-1 would fail)
    redis.call('DEL', KEYS[2], KEYS[3])
  end
end
-- Built by concatenation so the event JSON is passed through untouched (cjson would re-encode it).
local envelope = '{"epoch":"' .. epoch .. '","seq":' .. seq .. ',"event":' .. ARGV[2] .. '}'
local ttl = tonumber(ARGV[3])
if window > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', window, '0-' .. seq, 'env', envelope)
  redis.call('ZADD', KEYS[3], seq, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', seq - window)
else
  redis.call('XADD', KEYS[2], '0-' .. seq, 'env', envelope)
  redis.call('HSET', KEYS[3], ARGV[1], seq)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'env', envelope)
redis.call('SPUBLISH', ARGV[4], ARGV[7] .. '\n' .. envelope)
return {seq, 1, epoch}
