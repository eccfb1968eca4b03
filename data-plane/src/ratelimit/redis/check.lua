-- One request checked against many GCRA rates and monthly quotas, all-or-nothing: it is counted
-- against every one only if every one allows it. Runs after calendar.lua (month_of).
--
-- KEYS[i]                 the GCRA key of rate i; its value is the TAT in microseconds
-- ARGV[2i-1], ARGV[2i]    rate i's emission interval and tolerance, in microseconds
-- then per quota j, after the rates' arguments:
--   ARGV[q], ARGV[q+1]    the quota key without its month ("...quota:<scope>:<subject>:") and
--                         the requests allowed per month
--
-- Returns 4 integers per rate, then per quota: allowed (1/0), remaining, reset in
-- microseconds, retry-after in microseconds (0 when allowed).
--
-- Quota keys are named here, from the server's month, so they are not declared in KEYS: this
-- script is for a standalone Redis (or a primary with replicas), not Redis Cluster.

local time = redis.call('TIME')
-- The server's clock, so that nodes with skewed clocks agree.
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- Whole numbers as Redis arguments without exponent notation (a TAT is 16 digits).
local function int(x)
  return string.format('%.0f', x)
end

local replies = {}
local all_allowed = true

-- What this request has counted so far, by key, so that a key listed twice counts twice (as in
-- the local limiter).
local tats = {}
for i = 1, #KEYS do
  local emission = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local stored = tats[KEYS[i]] or tonumber(redis.call('GET', KEYS[i]) or '0')
  local tat = math.max(stored, now)
  local debt = tat - now
  if debt <= tolerance then
    tats[KEYS[i]] = tat + emission
    table.insert(replies, 1)
    table.insert(replies, math.floor((tolerance - debt) / emission))
    table.insert(replies, debt + emission)
    table.insert(replies, 0)
  else
    all_allowed = false
    table.insert(replies, 0)
    table.insert(replies, 0)
    table.insert(replies, debt)
    table.insert(replies, debt - tolerance)
  end
end

local month, next_month_starts = month_of(tonumber(time[1]))
local month_ends_in = next_month_starts * 1000000 - now
local used_by_key = {}
for q = 2 * #KEYS + 1, #ARGV, 2 do
  local key = ARGV[q] .. month
  local per_month = tonumber(ARGV[q + 1])
  local used = used_by_key[key] or tonumber(redis.call('GET', key) or '0')
  if used < per_month then
    used_by_key[key] = used + 1
    table.insert(replies, 1)
    table.insert(replies, per_month - used - 1)
    table.insert(replies, month_ends_in)
    table.insert(replies, 0)
  else
    all_allowed = false
    table.insert(replies, 0)
    table.insert(replies, 0)
    table.insert(replies, month_ends_in)
    table.insert(replies, month_ends_in)
  end
end

if all_allowed then
  for key, tat in pairs(tats) do
    -- The key lives until its TAT: after that it means the same as no key (a whole budget).
    local ttl_ms = math.max(1, math.ceil((tat - now) / 1000))
    redis.call('SET', key, int(tat), 'PX', int(ttl_ms))
  end
  for key, used in pairs(used_by_key) do
    -- The month's count is of no use once the month is over.
    redis.call('SET', key, int(used), 'PXAT', int(next_month_starts * 1000))
  end
end

return replies
