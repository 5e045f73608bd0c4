#!/usr/bin/env bash
# End-to-end throughput with tiny images (16×16 PNG → 8 px wide PNG): the whole system through
# its gateway, `JOBS` uploads by `CONCURRENCY` clients, timed until the job store says every job
# ended, on (a) the embedded profile (`pixmesh up`: SQLite, local blobs, pixmesh's registry) and
# (b) PostgreSQL + NATS (`--database postgres://… --queue nats://… --registry nats://…`; blobs
# local: the S3 backend is not there yet), same binary, same machine, same run; prints the ratio.
#
# Usage: bench/e2e.sh     Env: JOBS (default 3000), CONCURRENCY (default 32), WORKERS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-3000}"
CONCURRENCY="${CONCURRENCY:-32}"
WORKERS="${WORKERS:-2}"
SERVER="${PIXMESH_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
NATS="${PIXMESH_TEST_NATS:-nats://127.0.0.1:4222}"
cargo build --release -q -p pixmesh -p pixmesh-loadgen
T="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
db="pixmesh_bench_e2e_$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$SERVER" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

profile() { # label data-dir database [extra flags] ; prints the loadgen's JSON
  local label="$1" dir="$2" database="$3"
  shift 3
  mkdir -p "$dir"
  RUST_LOG=warn "$T/pixmesh" --database "$database" "$@" up --data-dir "$dir" --listen 127.0.0.1:0 --workers "$WORKERS" \
    --set log.level=warn --set gateway.rate=off >"$dir/up.out" 2>"$dir/up.err" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$dir/up.out" 2>/dev/null && break; sleep 0.5; done
  local gateway
  gateway="$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    try: v=json.loads(l)
    except Exception: continue
    if v.get("pixmesh")=="ready": print(v["gateway"])' "$dir/up.out")"
  [ -n "$gateway" ] || { echo "$label: pixmesh up did not become ready" >&2; cat "$dir/up.err" >&2; exit 1; }
  "$T/pixmesh-loadgen" e2e --gateway "http://$gateway" --key "$(cat "$dir/dev-api-key")" --database "$database" \
    --data-dir "$dir" --jobs "$JOBS" --concurrency "$CONCURRENCY"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "== (a) embedded: SQLite, local blobs, pixmesh's registry"
a="$(profile embedded "$work/a" "sqlite:$work/a/pixmesh.db")"
echo "  $a"
echo "== (b) PostgreSQL + NATS (wake-ups, events, KV registry)"
psql "$SERVER" -qc "CREATE DATABASE $db" >/dev/null
b="$(profile engines "$work/b" "${SERVER%/*}/$db" --queue "$NATS/benche2e$$" --registry "$NATS/benche2e$$")"
echo "  $b"
python3 - "$a" "$b" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("\nsummary (same run, same machine, tiny images):")
print(f"  embedded:          {a['jobs_per_second']:6.0f} jobs/s (uploads {a['uploads_per_second']:.0f}/s)")
print(f"  PostgreSQL + NATS: {b['jobs_per_second']:6.0f} jobs/s (uploads {b['uploads_per_second']:.0f}/s)"
      f" = {b['jobs_per_second'] / a['jobs_per_second']:.2f}x the embedded profile")
PY
