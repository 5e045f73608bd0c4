#!/usr/bin/env bash
# What the inbound sidecar adds to a request. The application is an instant upstream
# (`pixmesh-loadgen sink`); the same open-loop GET load (`pixmesh-loadgen rate`, RATE req/s,
# keep-alive connections as clients keep them) goes
#   direct    to the application, plain HTTP;
#   sidecar   through `pixmesh sidecar inbound`: TLS 1.3 (a certificate of a CA made here),
#             an API key, a per-key rate limit (above RATE, so nothing is refused), the body
#             limit, the access log and metrics;
# in turn for ROUNDS rounds. Prints p50/p99 per round, the medians, and the sidecar's added p99
# (its median p99 minus the direct one): the target is at most 1 ms at 2,000 req/s.
#
# Usage: bench/sidecar.sh      Env: RATE (2000), RUN_SECONDS (10), ROUNDS (3)
RATE="${RATE:-2000}"
SECONDS_PER_RUN="${RUN_SECONDS:-10}"
ROUNDS="${ROUNDS:-3}"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" pixmesh pixmesh-loadgen

# A CA and the sidecar's certificate for 127.0.0.1 (ECDSA P-256, as `pixmesh up --tls` makes).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
  -extfile "$work/ext" -out "$work/tls.crt" 2>/dev/null

"$T/pixmesh-loadgen" sink >"$work/sink.out" 2>"$work/sink.err" &
track $!
for _ in $(seq 1 50); do [ -s "$work/sink.out" ] && break; sleep 0.1; done
app="$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["sink"])' "$work/sink.out")"

cat >"$work/pixmesh.toml" <<TOML
[sidecar.inbound]
listen = "127.0.0.1:0"
app = "http://$app"
rate = "$((RATE * 4))/s"
[sidecar.inbound.tls]
cert = "$work/tls.crt"
key = "$work/tls.key"
TOML
# The access log is written (one JSON line per request), as in production.
PIXMESH_API_KEY=bench-key RUST_LOG=warn,pixmesh_gateway::access=info PIXMESH__LOG__FORMAT=json \
  "$T/pixmesh" --config "$work/pixmesh.toml" sidecar inbound >"$work/sc.out" 2>"$work/sc.err" &
track $!
for _ in $(seq 1 50); do grep -q listening "$work/sc.out" 2>/dev/null && break; sleep 0.1; done
read -r sidecar admin < <(python3 -c 'import json,sys; v=json.loads(open(sys.argv[1]).readline()); print(v["http"], v["admin"])' "$work/sc.out")
port="${sidecar##*:}"

echo "GET at $RATE req/s for ${SECONDS_PER_RUN} s per run; $ROUNDS rounds (direct, then through the sidecar)"
for r in $(seq 1 "$ROUNDS"); do
  "$T/pixmesh-loadgen" rate "http://$app/x" --rps "$RATE" --seconds "$SECONDS_PER_RUN" >"$work/direct.$r.json"
  "$T/pixmesh-loadgen" rate "https://127.0.0.1:$port/x" --ca "$work/ca.crt" --rps "$RATE" --seconds "$SECONDS_PER_RUN" \
    --api-key bench-key >"$work/sidecar.$r.json"
done

python3 - "$work" "$ROUNDS" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for run in ("direct", "sidecar"):
    runs = [json.load(open(f"{work}/{run}.{r}.json")) for r in range(1, rounds + 1)]
    p50 = [x["latency"]["p50_ms"] for x in runs]
    p99 = [x["latency"]["p99_ms"] for x in runs]
    failed = [x["failed_share"] for x in runs]
    med[run] = (statistics.median(p50), statistics.median(p99))
    for r, x in enumerate(runs, 1):
        bad = {k: v for k, v in x.get("statuses", {}).items() if not k.startswith("2")}
        if bad or x.get("errors"):
            print(f"  {run} round {r}: answers other than 2xx {bad}, errors {x.get('errors')}")
    print(f"  {run:8} p50 ms " + " ".join(f"{v:6.3f}" for v in p50) + "   p99 ms " + " ".join(f"{v:6.3f}" for v in p99)
          + f"   median p50 {med[run][0]:.3f} p99 {med[run][1]:.3f}   failed {max(failed):.4f}")
added = med["sidecar"][1] - med["direct"][1]
print(f"  the sidecar adds p50 {med['sidecar'][0] - med['direct'][0]:+.3f} ms, p99 {added:+.3f} ms"
      f" (target: at most +1 ms): {'met' if added <= 1.0 else 'NOT met'}")
PY
echo
echo "the sidecar's TLS handshakes and answers (its /metrics):"
curl -s "http://$admin/metrics" | { grep -E '^(pixmesh_tls_handshakes_total|pixmesh_gateway_responses_total)' || echo "(none)"; } | sed 's/^/  /'
echo
echo "the sidecar's warnings and errors (first 5 of $(grep -cE '"level":"(WARN|ERROR)"' "$work/sc.err" || true)):"
grep -E '"level":"(WARN|ERROR)"' "$work/sc.err" | head -5 | cut -c1-300 | sed 's/^/  /' || true
