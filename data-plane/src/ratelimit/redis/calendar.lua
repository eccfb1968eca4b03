-- Calendar months in UTC, for monthly quotas. Redis's Lua has no date library; these are
-- Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian), in floats that stay
-- exact because every value is a whole number far below 2^53.

local function floor_div(a, b)
  return math.floor(a / b)
end

-- Days since 1970-01-01 of year y, month m (1-12), day d.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor_div(y, 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = floor_div(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + floor_div(yoe, 4) - floor_div(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

-- The month holding `seconds` (since 1970, UTC): its "YYYY-MM" and the second the next one starts.
local function month_of(seconds)
  local z = floor_div(seconds, 86400) + 719468
  local era = floor_div(z, 146097)
  local doe = z - era * 146097
  local yoe = floor_div(doe - floor_div(doe, 1460) + floor_div(doe, 36524) - floor_div(doe, 146096), 365)
  local doy = doe - (365 * yoe + floor_div(yoe, 4) - floor_div(yoe, 100))
  local mp = floor_div(5 * doy + 2, 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local next_y, next_m = y, m + 1
  if next_m == 13 then next_y, next_m = y + 1, 1 end
  return string.format('%04d-%02d', y, m), days_from_civil(next_y, next_m, 1) * 86400
end
