#!/usr/bin/env bash
# What a route's mirror costs its clients: the pixmesh gateway in front of one upstream (an
# instant `pixmesh-loadgen sink`), with three routes to it:
#   /plain  no mirror,
#   /slow   every request mirrored to a shadow that answers after 2 s,
#   /hang   every request mirrored to a shadow that never answers;
# the mirror with its defaults (64 copies outstanding at most, 10 s each, bodies to 1 MiB).
# Each route gets GETs at a fixed RATE req/s (open loop, `pixmesh-loadgen rate`) for SECONDS,
# the three in turn for ROUNDS rounds; prints p50/p99 per round, the medians, and each mirrored
# route's p99 over /plain's, then the copies the mirror answered, failed and skipped.
#
# Usage: bench/mirror.sh      Env: RATE (2000), RUN_SECONDS (10), ROUNDS (3)
RATE="${RATE:-2000}"
SECONDS_PER_RUN="${RUN_SECONDS:-10}"
ROUNDS="${ROUNDS:-3}"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" pixmesh pixmesh-loadgen

start_sink() { # name [flags] ; prints the sink's address
  "$T/pixmesh-loadgen" sink "${@:2}" >"$work/$1.out" 2>"$work/$1.err" &
  track $!
  for _ in $(seq 1 50); do [ -s "$work/$1.out" ] && break; sleep 0.1; done
  python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["sink"])' "$work/$1.out"
}
primary="$(start_sink primary)"
slow="$(start_sink slow --delay-ms 2000)"
hang="$(start_sink hang --never)"

cat >"$work/gateway.toml" <<EOF
[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rate = "off"
access_log = false
[gateway.upstreams]
primary = "http://$primary"
slow = "http://$slow"
hang = "http://$hang"
[[gateway.routes]]
prefix = "/plain"
upstream = "primary"
[[gateway.routes]]
prefix = "/slow"
upstream = "primary"
mirror = { upstream = "slow", percent = 100 }
[[gateway.routes]]
prefix = "/hang"
upstream = "primary"
mirror = { upstream = "hang", percent = 100 }
EOF
PIXMESH_API_KEY=bench-key RUST_LOG=warn "$T/pixmesh" --config "$work/gateway.toml" gateway >"$work/gw.out" 2>"$work/gw.err" &
track $!
for _ in $(seq 1 50); do grep -q listening "$work/gw.out" 2>/dev/null && break; sleep 0.1; done
read -r http admin < <(python3 -c 'import json,sys; v=json.loads(open(sys.argv[1]).readline()); print(v["http"], v["admin"])' "$work/gw.out")

echo "GET at $RATE req/s for ${SECONDS_PER_RUN} s per route and round; $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
  for route in plain slow hang; do
    "$T/pixmesh-loadgen" rate "http://$http/$route/x" --rps "$RATE" --seconds "$SECONDS_PER_RUN" --api-key bench-key \
      >"$work/$route.$r.json"
  done
done

python3 - "$work" "$ROUNDS" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for route in ("plain", "slow", "hang"):
    runs = [json.load(open(f"{work}/{route}.{r}.json")) for r in range(1, rounds + 1)]
    p50 = [x["latency"]["p50_ms"] for x in runs]
    p99 = [x["latency"]["p99_ms"] for x in runs]
    failed = [x["failed_share"] for x in runs]
    med[route] = statistics.median(p99)
    print(f"  /{route:5}  p50 ms " + " ".join(f"{v:6.3f}" for v in p50) + f"   p99 ms " + " ".join(f"{v:6.3f}" for v in p99)
          + f"   median p99 {med[route]:.3f}   failed {max(failed):.4f}")
for route in ("slow", "hang"):
    print(f"  /{route} p99 over /plain p99: {med[route] / med['plain']:.2f}x ({med[route] - med['plain']:+.3f} ms)")
EOF
echo
echo "the mirror's copies (gateway /metrics):"
curl -s "http://$admin/metrics" | { grep '^pixmesh_gateway_mirror_requests_total' || echo "(none)"; } | sed 's/^/  /'
