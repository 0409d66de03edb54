-- Assign the stream's next sequence number, append to its replay log, add to its partition's stream,
-- publish on the partition's shard channel: one atomic step. Every key and the channel carry the
-- partition's hash tag (runbell.bus.keys), so this is one call on Redis Cluster too.
-- KEYS[1] seq counter, KEYS[2] replay log (stream), KEYS[3] event id -> seq, KEYS[4] epoch,
-- KEYS[5] writer (the run_id of the Redis server process that last wrote the stream's state),
-- KEYS[6] the partition's stream (recorder), capped at about ARGV[6] entries
-- ARGV[1] event id, ARGV[2] event JSON, ARGV[3] TTL in seconds, ARGV[4] shard channel,
-- ARGV[5] window: 0 for a run's stream, which ends: KEYS[3] is a hash and all
--   five keys expire TTL seconds after the last event. N > 0 for an endless stream (an asset's):
--   the log keeps the last N entries, KEYS[3] is a sorted set remembering the ids of the last
--   N seqs, both expire TTL seconds after the last event, and the seq counter, epoch and writer never
--   expire, so a client's Last-Event-ID keeps its meaning however long the asset is quiet.
-- The epoch (runbell.bus.schema) is made when the seq starts at 1 or KEYS[4] is missing (the stream's
-- first event; Redis lost all of its state: restart without persistence, expiry, eviction), and when
-- the server writing the stream is not the one that wrote it last: Redis restarted from a snapshot
-- or failed over to a replica, either of which may hold only part of the stream's writes, so its seq
-- may have gone back to one readers already saw. INFO's run_id is random per server process, kept in
-- no snapshot or AOF, and a replica has its own; the new epoch makes the repeated seqs new positions,
-- and the seq goes on. A writer key that is missing (state written before writers were kept) is
-- adopted without a new epoch. Where INFO is not available (fakeredis, the development broker; a hook
-- user not granted INFO SERVER) the writer is "" and only a lost state makes a new epoch.
-- The epoch is the server's time in microseconds, 13 hex digits, so epochs sort in the order they
-- were made; never at or before the epoch it replaces (a server whose clock is behind).
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
local writer = ''
local ok, info = pcall(redis.call, 'INFO', 'server')
if ok and type(info) == 'string' then
  writer = string.match(info, 'run_id:(%x+)') or ''
end
local last_writer = redis.call('GET', KEYS[5])
local moved = writer ~= '' and last_writer and last_writer ~= '' and last_writer ~= writer
if seq == 1 or not epoch or moved then
  local now = redis.call('TIME')
  local made = string.format('%08x%05x', tonumber(now[1]), tonumber(now[2]))
  if epoch and #epoch == 13 and made <= epoch then
    made = string.format('%013x', tonumber(epoch, 16) + 1)
  end
  epoch = made
  redis.call('SET', KEYS[4], epoch)
  if seq == 1 then -- what a lost counter left of the log belongs to a dead epoch (XADD 0-1 would fail)
    redis.call('DEL', KEYS[2], KEYS[3])
  end
end
if writer ~= '' and writer ~= last_writer then
  redis.call('SET', KEYS[5], writer)
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
  redis.call('EXPIRE', KEYS[5], ttl)
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*', 'env', envelope)
redis.call('SPUBLISH', ARGV[4], ARGV[7] .. '\n' .. envelope)
return {seq, 1, epoch}
