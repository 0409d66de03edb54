-- Assign the stream's next sequence number, append to its replay log, publish: one atomic step.
-- KEYS[1] seq counter, KEYS[2] replay log (stream), KEYS[3] event id -> seq
-- ARGV[1] event id, ARGV[2] event JSON, ARGV[3] TTL in seconds, ARGV[4] pub/sub channel,
-- ARGV[5] (optional) window: absent or 0 for a run's stream, which ends: KEYS[3] is a hash and all
--   three keys expire TTL seconds after the last event. N > 0 for an endless stream (an asset's):
--   the log keeps the last N entries, KEYS[3] is a sorted set remembering the ids of the last
--   N seqs, both expire TTL seconds after the last event, and the seq counter never expires, so a
--   client's Last-Event-ID keeps its meaning however long the asset is quiet.
-- Returns {seq, 1} for a new event, {seq, 0} when this event id was already published (a re-send).
local window = tonumber(ARGV[5] or '0') or 0
local known
if window > 0 then
  known = redis.call('ZSCORE', KEYS[3], ARGV[1])
else
  known = redis.call('HGET', KEYS[3], ARGV[1])
end
if known then
  return {tonumber(known), 0}
end
local seq = redis.call('INCR', KEYS[1])
-- Built by concatenation so the event JSON is passed through untouched (cjson would re-encode it).
local envelope = '{"seq":' .. seq .. ',"event":' .. ARGV[2] .. '}'
local ttl = tonumber(ARGV[3])
if window > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', window, '0-' .. seq, 'env', envelope)
  redis.call('ZADD', KEYS[3], seq, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', seq - window)
else
  redis.call('XADD', KEYS[2], '0-' .. seq, 'env', envelope)
  redis.call('HSET', KEYS[3], ARGV[1], seq)
  redis.call('EXPIRE', KEYS[1], ttl)
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('PUBLISH', ARGV[4], envelope)
return {seq, 1}
