#!/usr/bin/env bash
# Worker-picking benchmark with simulated workers (real gRPC servers on 127.0.0.1 that sleep a
# service time, capacity 4 each, no pixels), same run:
#   1. one worker of four 10× slower: pixmesh's pick (power of two choices over peak-EWMA load,
#      slots, breakers) against round-robin — throughput against the ideal (the healthy
#      capacity), the ratio between them, p50/p99 and the slow worker's share of calls;
#   2. scaling from 1 to 16 healthy workers: throughput / ideal (efficiency);
#   3. the cost of one pick, without the call.
# Usage: bench/balance.sh      Env: SECONDS_PER_RUN (default 5), SERVICE_MS (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${SECONDS_PER_RUN:-5}"
SERVICE="${SERVICE_MS:-20}"
cargo build --release -q -p pixmesh-loadgen
L="${CARGO_TARGET_DIR:-target}/release/pixmesh-loadgen"
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

p2c=$("$L" balance --workers 4 --slow 1 --slow-factor 10 --service-ms "$SERVICE" --policy p2c --seconds "$DUR")
rr=$("$L" balance --workers 4 --slow 1 --slow-factor 10 --service-ms "$SERVICE" --policy rr --seconds "$DUR")
python3 - "$p2c" "$rr" "$SERVICE" <<'PY'
import json, sys
p, r, service = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
print("1 slow (10x) of 4 workers, closed loop at the healthy capacity:")
for x in (p, r):
    print(f"  {x['policy']:4} {x['per_second']:8.1f} calls/s = {x['per_second']/x['ideal_per_second']:.2f} of ideal "
          f"({x['ideal_per_second']:.0f}); p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms "
          f"({x['p99_ms']/service:.2f}x the service time); slow worker's share {100*x['last_worker_share']:.1f}%")
print(f"  p2c / round-robin throughput: {p['per_second']/max(r['per_second'],1e-9):.1f}x")
PY

echo "scaling, all workers healthy (p2c):"
for n in 1 2 4 8 16; do
  out=$("$L" balance --workers "$n" --service-ms "$SERVICE" --policy p2c --seconds "$DUR")
  python3 -c "import json,sys; x=json.loads(sys.argv[1]); print(f\"  {x['workers']:2} workers: {x['per_second']:8.1f} calls/s, efficiency {x['per_second']/x['ideal_per_second']:.2f}, p99 {x['p99_ms']:.1f} ms\")" "$out"
done
out=$("$L" pick-overhead --workers 16)
echo "one pick among 16 workers (acquire + finish, no call): $(field "$out" pick_ns) ns"
