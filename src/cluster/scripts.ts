import { createHash } from 'node:crypto'
import type { RedisArgument } from 'redis'
import { isNoScript } from './redis-client.js'

// The directory's Lua scripts. Each runs atomically in Redis, so a decision and its writes can
// never interleave with another replica's. Sent by SHA (EVALSHA); a Redis that lost its script
// cache (a restart) answers NOSCRIPT, and the script is then sent whole once (EVAL caches it).
//
// Keys of one sandbox share the hash tag {sandboxId} (owner, fence, superseded), so the scripts
// would also run on a Redis Cluster. Numbers are written with %d: Lua's default number-to-string
// conversion switches to exponent notation for large values.

// KEYS: owner hash, fence counter, superseded zset.
// ARGV: sandboxId, replicaId, instanceId ('' = none), sessionId, registeredAt, superseded cap.
// Mirrors SessionRegistry.mayRegister/register: a process that a newer one replaced is refused
// while a record exists for a different process; anything else wins, takes the record, and
// raises the fence. The fence counter, when missing (never set, or lost with Redis's data),
// starts from the server's clock in ms, so fences keep rising across a Redis restart.
// Returns {'registered', fence, prevReplica, prevSession, prevFence, prevInstance, superseded...}
// (superseded as member, score pairs, oldest first) or {'refused', 'superseded', owner fields...}.
export const REGISTER = `
local inst = ARGV[3]
local cur = redis.call('HMGET', KEYS[1], 'replicaId', 'sessionId', 'fence', 'instanceId')
if cur[3] and inst ~= '' and cur[4] ~= inst and redis.call('ZSCORE', KEYS[3], inst) then
  return {'refused', 'superseded', cur[1], cur[2], cur[3], cur[4]}
end
local counter = tonumber(redis.call('GET', KEYS[2]))
local fence
if counter then
  fence = counter + 1
else
  local t = redis.call('TIME')
  fence = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if cur[3] and tonumber(cur[3]) >= fence then fence = tonumber(cur[3]) + 1 end
local f = string.format('%d', fence)
redis.call('SET', KEYS[2], f)
if inst ~= '' then redis.call('ZREM', KEYS[3], inst) end
if cur[4] and cur[4] ~= '' and cur[4] ~= inst then
  redis.call('ZADD', KEYS[3], f, cur[4])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[6]) + 1))
end
redis.call('HSET', KEYS[1], 'sandboxId', ARGV[1], 'replicaId', ARGV[2], 'instanceId', inst,
  'sessionId', ARGV[4], 'fence', f, 'registeredAt', ARGV[5])
local out = {'registered', f, cur[1] or '', cur[2] or '', cur[3] or '', cur[4] or ''}
for _, v in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')) do table.insert(out, v) end
return out
`

// KEYS: owner hash, fence counter, superseded zset.
// ARGV: sandboxId, replicaId, instanceId, sessionId, registeredAt, fence, superseded cap,
// then superseded member, score pairs.
// Re-publishes a registration this replica made, after Redis lost it. It writes only into a
// vacancy nobody registered into since: the record is absent and the counter has not passed our
// fence. A record of the same replica and session is still ours ('kept', with its fence, which
// is higher if a registration we gave up on ran late); any other record is a newer owner
// ('lost'); a counter past our fence means someone registered after us ('stale').
// Returns {outcome, fence}.
export const RESTORE = `
local cur = redis.call('HMGET', KEYS[1], 'fence', 'replicaId', 'sessionId')
if cur[1] then
  if cur[2] == ARGV[2] and cur[3] == ARGV[4] then return {'kept', cur[1]} end
  return {'lost', cur[1]}
end
local counter = redis.call('GET', KEYS[2])
if counter and tonumber(counter) > tonumber(ARGV[6]) then return {'stale', counter} end
redis.call('SET', KEYS[2], ARGV[6])
for i = 8, #ARGV, 2 do
  if ARGV[i] ~= ARGV[3] then redis.call('ZADD', KEYS[3], 'NX', ARGV[i + 1], ARGV[i]) end
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[7]) + 1))
redis.call('HSET', KEYS[1], 'sandboxId', ARGV[1], 'replicaId', ARGV[2], 'instanceId', ARGV[3],
  'sessionId', ARGV[4], 'fence', ARGV[6], 'registeredAt', ARGV[5])
return {'restored', ARGV[6]}
`

// KEYS: owner hash. ARGV: replicaId, fence.
// Compare-and-delete: only the registration that still holds the record may clear it, so a
// replica whose supervisor moved away never removes the new owner's record.
export const RELEASE = `
local cur = redis.call('HMGET', KEYS[1], 'fence', 'replicaId')
if not cur[1] then return 'absent' end
if cur[1] == ARGV[2] and cur[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 'released'
end
return 'not_owner'
`

// KEYS: finished hash. ARGV: digest, meta, record, stdout, stderr, ttl ms.
// The first terminal write of an exec wins; a repeat of the same content is 'same', anything
// else is a 'conflict' and changes nothing (not even the TTL).
export const PUT_FINISHED = `
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'digest') == ARGV[1] then return 'same' end
  return 'conflict'
end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'meta', ARGV[2], 'record', ARGV[3], 'stdout', ARGV[4], 'stderr', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 'written'
`

interface EvalClient {
  evalSha: (sha1: RedisArgument, options: { keys: RedisArgument[], arguments: RedisArgument[] }) => Promise<unknown>
  eval: (script: RedisArgument, options: { keys: RedisArgument[], arguments: RedisArgument[] }) => Promise<unknown>
}

const shas = new Map<string, string>()

// KEYS: counter. ARGV: window ms. A fixed window per key: the first hit of a window starts its
// TTL. Returns {count in this window, ms left of it}.
export const RATE_HIT = `
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
`

export async function runScript (client: EvalClient, script: string, keys: string[], args: RedisArgument[]): Promise<unknown> {
  let sha = shas.get(script)
  if (sha === undefined) {
    sha = createHash('sha1').update(script).digest('hex')
    shas.set(script, sha)
  }
  try {
    return await client.evalSha(sha, { keys, arguments: args })
  } catch (err) {
    if (!isNoScript(err)) throw err
    return await client.eval(script, { keys, arguments: args })
  }
}
