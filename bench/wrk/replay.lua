-- Replays pre-built raw HTTP requests (bench/benchlib.py writes them, signed).
-- The file named by the first script argument holds records "<length>\n<bytes>";
-- each thread starts at a random record and goes round-robin. `done` prints one
-- line "WRKJSON {...}" with the counts and a grid of latency percentiles (us),
-- which the Python side merges across several wrk processes.

local requests = {}
local position = 0

local function load(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  local i = 1
  local list = {}
  while i <= #data do
    local nl = string.find(data, "\n", i, true)
    local len = tonumber(string.sub(data, i, nl - 1))
    list[#list + 1] = string.sub(data, nl + 1, nl + len)
    i = nl + len + 1
  end
  return list
end

function init(args)
  requests = load(args[1])
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  position = math.random(#requests) - 1
end

function request()
  position = position % #requests + 1
  return requests[position]
end

local GRID = {}
for p = 1, 199 do GRID[#GRID + 1] = p * 0.5 end        -- 0.5 .. 99.5
for p = 1, 4 do GRID[#GRID + 1] = 99.5 + p * 0.1 end   -- 99.6 .. 99.9
GRID[#GRID + 1] = 99.95
GRID[#GRID + 1] = 99.99

function done(summary, latency, _)
  local e = summary.errors
  local parts = {}
  for _, p in ipairs(GRID) do
    parts[#parts + 1] = string.format("[%g,%d]", p, latency:percentile(p))
  end
  io.write(string.format(
    'WRKJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.2f,"stdev":%.2f},"percentiles_us":[%s]}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ",")))
end
