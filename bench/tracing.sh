#!/usr/bin/env bash
# What exported traces cost: the whole system on the embedded profile (`pixmesh up`: SQLite,
# local blobs), `JOBS` tiny uploads (16x16 PNG -> 8 px wide PNG) by `CONCURRENCY` clients, timed
# until the job store says every job ended, with tracing
#   off: no OTEL_EXPORTER_OTLP_ENDPOINT (the default), and
#   on:  every role exporting every span over OTLP/gRPC to a receiver on this host (the tests'
#        own, `pixmesh-loadgen otlp-receiver`, which decodes every export and counts its spans),
#        sampling everything (the SDK's default).
# The two alternate `ROUNDS` times, same binary, same run; prints each round's jobs/s, the
# medians, on/off, and the spans the receiver took per job.
#
# Usage: bench/tracing.sh     Env: JOBS (1500), CONCURRENCY (32), WORKERS (2), ROUNDS (3)
JOBS="${JOBS:-1500}"
CONCURRENCY="${CONCURRENCY:-32}"
WORKERS="${WORKERS:-2}"
ROUNDS="${ROUNDS:-3}"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" pixmesh pixmesh-loadgen

run() { # label dir [VAR=value ...] ; prints jobs/s
  local label="$1" dir="$2"
  shift 2
  mkdir -p "$dir"
  env "$@" RUST_LOG=warn "$T/pixmesh" --database "sqlite:$dir/pixmesh.db" up --data-dir "$dir" --listen 127.0.0.1:0 \
    --workers "$WORKERS" --set log.level=warn --set upload.cache=off --set gateway.rate=off >"$dir/up.out" 2>"$dir/up.err" &
  local pid=$!
  track "$pid"
  for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$dir/up.out" 2>/dev/null && break; sleep 0.5; done
  local gateway
  gateway="$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    try: v=json.loads(l)
    except Exception: continue
    if v.get("pixmesh")=="ready": print(v["gateway"])' "$dir/up.out")"
  [ -n "$gateway" ] || { echo "$label: pixmesh up did not become ready" >&2; cat "$dir/up.err" >&2; exit 1; }
  "$T/pixmesh-loadgen" e2e --gateway "http://$gateway" --key "$(cat "$dir/dev-api-key")" --database "sqlite:$dir/pixmesh.db" \
    --data-dir "$dir" --jobs "$JOBS" --concurrency "$CONCURRENCY" >"$dir/load.json"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs_per_second"], 1))' "$dir/load.json"
}

"$T/pixmesh-loadgen" otlp-receiver >"$work/otlp.out" 2>"$work/otlp.err" &
receiver=$!
track "$receiver"
for _ in $(seq 1 50); do [ -s "$work/otlp.out" ] && break; sleep 0.1; done
endpoint="$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["endpoint"])' "$work/otlp.out")"

off=()
on=()
for r in $(seq 1 "$ROUNDS"); do
  off+=("$(run "off-$r" "$work/off-$r")")
  on+=("$(run "on-$r" "$work/on-$r" OTEL_EXPORTER_OTLP_ENDPOINT="$endpoint")")
  echo "round $r: off ${off[-1]} jobs/s, on ${on[-1]} jobs/s"
done
kill -TERM "$receiver"
wait "$receiver" 2>/dev/null || true
python3 - "$work/otlp.out" "$JOBS" "$ROUNDS" "${off[*]}" "${on[*]}" <<'PY'
import json, statistics, sys
lines = open(sys.argv[1]).read().split("\n")
taken = json.loads([l for l in lines if l.strip()][-1])
jobs, rounds = int(sys.argv[2]), int(sys.argv[3])
off = [float(x) for x in sys.argv[4].split()]
on = [float(x) for x in sys.argv[5].split()]
m_off, m_on = statistics.median(off), statistics.median(on)
print(f"tracing off: median {m_off:.1f} jobs/s  {off}")
print(f"tracing on:  median {m_on:.1f} jobs/s  {on}  ({taken['spans'] / (jobs * rounds):.1f} spans/job received, {taken['exports']} exports)")
print(f"the receiver (on this host, counting only) used {taken['cpu_seconds']:.1f} s of CPU over the {rounds} traced rounds")
print(f"on/off: {m_on / m_off:.3f}  (target >= 0.95)")
PY
