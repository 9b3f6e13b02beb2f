"""The shared store's server-side Lua scripts, each atomic on the Redis server.

Owns what runs inside Redis (``daemon.cache.redis`` registers and calls them;
the key layout they walk is in ``daemon.cache.redis_keys``). Every script takes
the key prefix ``P`` as ``ARGV[1]`` where it derives keys from stored data, so
these scripts are not for Redis Cluster.

* ``DELETE``: per id, the entry, its index memberships, its ``bref``
  memberships and every blob left unreferenced (except the ``keep`` digests).
* ``LOOKUP``: the oldest member of an index whose entry hash and mask blob both
  exist; dead members on the way are removed from that index and reported.
* ``NEAR``: the union of 16 pHash band sets, with each id's pHash from the
  skeletons hash (``false`` where the skeleton is gone).
* ``FETCH``: entry hashes by id, ``{}`` where the entry or its mask blob is gone.
* ``HITS``: coalesced hit counts; renews the TTL of the entry and its blobs.
"""
from __future__ import annotations

# Shared by the scripts: split a skeleton or read the same fields from an entry hash.
SKELETON = r"""
local function skeleton(P, id)
  local s = redis.call('HGET', P .. 'ids', id)
  if s then
    local f = {}
    for part in (s .. '\t'):gmatch('(.-)\t') do f[#f + 1] = part end
    return f, true
  end
  local h = redis.call('HMGET', P .. 'e:' .. id, 'ph', 'key', 'sha', 'pix', 'mask', 'out', 'sz', 'o')
  if not h[2] then return nil, false end
  local ph = h[1]
  if h[8] and h[8] ~= '' then ph = '-' end
  return {ph, h[2], h[3], h[4], h[5], h[6] or '', h[7] or '0'}, false
end
"""

# ARGV: P, nkeep, keep digests..., ids...  ->  {removed, {freed digests}}
DELETE = SKELETON + r"""
local P = ARGV[1]
local nkeep = tonumber(ARGV[2])
local keep = {}
for i = 3, 2 + nkeep do keep[ARGV[i]] = true end
local removed, freed = 0, {}
for i = 3 + nkeep, #ARGV do
  local id = ARGV[i]
  local f, counted = skeleton(P, id)
  if f then
    local key = f[2]
    redis.call('ZREM', P .. 'sha:' .. key .. ':' .. f[3], id)
    redis.call('ZREM', P .. 'pix:' .. key .. ':' .. f[4], id)
    if f[1] ~= '-' and #f[1] == 64 then
      for b = 0, 15 do
        local v = tonumber(string.sub(f[1], 4 * b + 1, 4 * b + 4), 16)
        redis.call('SREM', P .. 'band:' .. key .. ':' .. b .. ':' .. string.format('%d', v), id)
      end
    end
    redis.call('DEL', P .. 'e:' .. id)
    if counted then
      redis.call('HDEL', P .. 'ids', id)
      redis.call('DECRBY', P .. 'bytes', f[7])
    end
    local digests = {f[5]}
    if f[6] ~= '' and f[6] ~= f[5] then digests[2] = f[6] end
    for _, d in ipairs(digests) do
      if d ~= '' then
        local rk = P .. 'bref:' .. d
        redis.call('SREM', rk, id)
        if redis.call('SCARD', rk) == 0 and not keep[d] then
          redis.call('DEL', P .. 'blob:' .. d)
          freed[#freed + 1] = d
        end
      end
    end
    removed = removed + 1
  end
end
return {removed, freed}
"""

# KEYS[1]: index zset. ARGV: P, hint id  ->  {id or '', fields or {}, {dead ids}}
LOOKUP = r"""
local P, hint = ARGV[1], ARGV[2]
local dead = {}
for _ = 1, 32 do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  local id = first[1]
  if not id then break end
  local ek = P .. 'e:' .. id
  local mask = redis.call('HGET', ek, 'mask')
  if mask and redis.call('EXISTS', P .. 'blob:' .. mask) == 1 then
    if id == hint then return {id, {}, dead} end
    return {id, redis.call('HGETALL', ek), dead}
  end
  redis.call('ZREM', KEYS[1], id)
  dead[#dead + 1] = id
end
return {'', {}, dead}
"""

# KEYS[1..16]: band sets, KEYS[17]: ids hash  ->  {{ids}, {phash hex or false}}
NEAR = r"""
local ids = redis.call('SUNION', unpack(KEYS, 1, 16))
local phs = {}
for i = 1, #ids, 2000 do
  local j = math.min(i + 1999, #ids)
  local part = redis.call('HMGET', KEYS[17], unpack(ids, i, j))
  for k = 1, j - i + 1 do
    local s = part[k]
    if s then phs[#phs + 1] = string.sub(s, 1, 64) else phs[#phs + 1] = false end
  end
end
return {ids, phs}
"""

# ARGV: P, ids...  ->  {fields or {} per id}; {} when the entry or its mask blob is gone
FETCH = r"""
local P = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local ek = P .. 'e:' .. ARGV[i]
  local mask = redis.call('HGET', ek, 'mask')
  if mask and redis.call('EXISTS', P .. 'blob:' .. mask) == 1 then
    out[#out + 1] = redis.call('HGETALL', ek)
  else
    out[#out + 1] = {}
  end
end
return out
"""

# ARGV: P, ttl seconds (0: none), then (id, last_hit, n) triples
HITS = r"""
local P = ARGV[1]
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local ek = P .. 'e:' .. ARGV[i]
  if redis.call('EXISTS', ek) == 1 then
    redis.call('HINCRBY', ek, 'hits', ARGV[i + 2])
    local last = tonumber(redis.call('HGET', ek, 'lh') or '0') or 0
    if tonumber(ARGV[i + 1]) > last then redis.call('HSET', ek, 'lh', ARGV[i + 1]) end
    if ttl > 0 then
      redis.call('EXPIRE', ek, ttl)
      local d = redis.call('HMGET', ek, 'mask', 'out')
      if d[1] and d[1] ~= '' then redis.call('EXPIRE', P .. 'blob:' .. d[1], ttl) end
      if d[2] and d[2] ~= '' then redis.call('EXPIRE', P .. 'blob:' .. d[2], ttl) end
    end
  end
end
return 1
"""
