-- wrk script for the scoring benchmarks: POST the JSON body in $BODY_FILE to the URL given to wrk.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
