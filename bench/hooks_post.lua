-- wrk script: POST pre-signed webhook deliveries, each once (per thread: every Nth line).
-- DELIVERIES_FILE lines: <delivery id>\t<signature header>\t<body>
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  local n = 0
  local stride = tonumber(os.getenv("WRK_THREADS") or "1")
  for line in io.lines(os.getenv("DELIVERIES_FILE")) do
    if n % stride == id then
      local delivery, signature, body = line:match("([^\t]*)\t([^\t]*)\t(.*)")
      table.insert(requests, wrk.format("POST", "/hooks/generic", {
        ["Content-Type"] = "application/json",
        ["X-Modelcd-Delivery-Id"] = delivery,
        ["X-Modelcd-Signature"] = signature,
      }, body))
    end
    n = n + 1
  end
  index = 0
end

function request()
  index = index + 1
  if index > #requests then
    index = 1 -- past the end: repeats are duplicates (acknowledged, not stored)
  end
  return requests[index]
end
