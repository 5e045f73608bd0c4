#!/usr/bin/env bash
# Worker-picking benchmark with simulated workers (real gRPC servers on 127.0.0.1 that sleep a
# service time, capacity 4 each, no pixels), same run:
#   1. one worker of four 10× slower: pixmesh's pick (power of two choices over peak-EWMA load,
#      slots, breakers) against round-robin — throughput against the ideal (the healthy
#      capacity), the ratio between them, p50/p99 and the slow worker's share of calls; then
#      the same with the slow worker 50× slower (a 50 ms stall on a fast backend, as in the
#      nginx/HAProxy measurements the targets come from);
#   2. the burst after idleness: with one worker of four 10× slower, the closed loop (it learns
#      the latencies), then ~1.5 s idle, then a burst of calls sent at once (4× the healthy
#      slots): the slow worker's share of the burst, p2c beside round-robin. Its estimate has
#      decayed while idle, the others' rise at once under the burst; pixmesh re-probes it with
#      one call at a time instead of filling its slots;
#   3. scaling from 1 to 16 healthy workers: throughput / ideal (efficiency), and the dispatch
#      overhead per call (mean call time minus the workers' own service time), beside the same
#      with each caller pinned to one worker (as many callers as slots: no pick, no queueing,
#      the plain gRPC call): the difference is what picking costs;
#   4. the cost of one pick, without the call.
# The ideal is every healthy slot busy all the time: slots / service time, both at the nominal
# service time and at the one the healthy workers actually gave (a timer sleep overshoots).
# Usage: bench/balance.sh      Env: SECONDS_PER_RUN (default 5), SERVICE_MS (default 20),
#                                   IDLE_MS (default 1500)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${SECONDS_PER_RUN:-5}"
SERVICE="${SERVICE_MS:-20}"
IDLE="${IDLE_MS:-1500}"
cargo build --release -q -p pixmesh-loadgen
L="${CARGO_TARGET_DIR:-target}/release/pixmesh-loadgen"

compare() { # slow factor
  local p2c rr
  p2c=$("$L" balance --workers 4 --slow 1 --slow-factor "$1" --service-ms "$SERVICE" --policy p2c --seconds "$DUR")
  rr=$("$L" balance --workers 4 --slow 1 --slow-factor "$1" --service-ms "$SERVICE" --policy rr --seconds "$DUR")
  python3 - "$p2c" "$rr" "$SERVICE" "$1" <<'PY'
import json, sys
p, r, service, factor = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print(f"1 slow ({factor}x) of 4 workers, closed loop at the healthy capacity:")
for x in (p, r):
    print(f"  {x['policy']:4} {x['per_second']:8.1f} calls/s = {x['per_second']/x['ideal_served_per_second']:.2f} of ideal "
          f"({x['ideal_served_per_second']:.0f}/s at the {x['served_ms']:.2f} ms served; "
          f"{x['per_second']/x['ideal_per_second']:.2f} of {x['ideal_per_second']:.0f}/s nominal); "
          f"p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms ({x['p99_ms']/service:.2f}x the service time); "
          f"slow worker's share {100*x['last_worker_share']:.1f}%")
print(f"  p2c / round-robin throughput: {p['per_second']/max(r['per_second'],1e-9):.1f}x")
PY
}
compare 10
compare 50

burst() { # slow factor
  local p2c rr
  # 4 workers of capacity 4, one slow: 12 healthy slots, a burst of 48 calls.
  p2c=$("$L" balance --workers 4 --slow 1 --slow-factor "$1" --service-ms "$SERVICE" --policy p2c --seconds "$DUR" --idle-ms "$IDLE" --burst 48)
  rr=$("$L" balance --workers 4 --slow 1 --slow-factor "$1" --service-ms "$SERVICE" --policy rr --seconds "$DUR" --idle-ms "$IDLE" --burst 48)
  python3 - "$p2c" "$rr" "$1" <<'PY'
import json, sys
p, r, factor = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
b = p["burst"]
print(f"burst after {b['idle_ms']} ms idle, 1 slow ({factor}x) of 4 workers, {b['calls']} calls at once:")
for x in (p, r):
    b = x["burst"]
    print(f"  {x['policy']:4} slow worker took {b['last_worker_calls']:3} of {b['calls']} ({100*b['last_worker_share']:.1f}%), "
          f"burst done in {b['ms']:.0f} ms (its share in the closed loop before: {100*x['last_worker_share']:.1f}%)")
PY
}
burst 10

echo "scaling, all workers healthy (p2c; callers pinned to workers beside it as the plain-gRPC anchor):"
for n in 1 2 4 8 16; do
  p2c=$("$L" balance --workers "$n" --service-ms "$SERVICE" --policy p2c --seconds "$DUR")
  rr=$("$L" balance --workers "$n" --service-ms "$SERVICE" --policy pinned --seconds "$DUR")
  python3 -c "
import json,sys
x, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
o, ro = x['mean_ms']-x['served_ms'], r['mean_ms']-r['served_ms']
print(f\"  {x['workers']:2} workers: {x['per_second']:8.1f} calls/s, efficiency {x['per_second']/x['ideal_served_per_second']:.2f} \"
      f\"({x['per_second']/x['ideal_per_second']:.2f} nominal), p99 {x['p99_ms']:.1f} ms, \"
      f\"overhead per call {o:.3f} ms (pinned, the plain call: {ro:.3f} ms; the pick adds {o-ro:+.3f} ms)\")" "$p2c" "$rr"
done
out=$("$L" pick-overhead --workers 16)
echo "one pick among 16 workers (acquire + finish, no call): $(python3 -c "import json,sys; print(json.loads(sys.argv[1])['pick_ns'])" "$out") ns"
