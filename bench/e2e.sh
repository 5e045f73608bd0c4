#!/usr/bin/env bash
# End to end, the whole system through its gateway, same binary, same machine, same run:
#
# 1. Throughput with tiny images (16x16 PNG -> 8 px wide PNG): `JOBS` uploads by `CONCURRENCY`
#    clients, timed until the job store says every job ended, on
#    (a) the embedded profile (`pixmesh up`: SQLite, local blobs, pixmesh's registry),
#    (b) PostgreSQL + NATS (`--database postgres://... --queue nats://... --registry nats://...`),
#    (c) PostgreSQL + NATS + S3 (`--blobs s3://...`, an s3s-fs server started here, signatures
#        checked),
#    (d) the same with every S3 request answered `S3_LATENCY_MS` late (default 20 ms, about a
#        remote S3's time to first byte): throughput must not fall with the blob store's latency;
#    prints (b), (c) and (d) as ratios of (a).
# 2. The distributor's CPU time per job with multi-MB images (`BIG_IMAGE`, default a 4.6 MB
#    14.7 MP photo of the corpus, resized to 1920 px wide JPEG; `BIG_JOBS` of them): (b) the bytes
#    travel through the distributor over gRPC, (c) workers get presigned URLs and the bytes go
#    between them and S3. Read from /proc of the distributor process.
#
# Usage: bench/e2e.sh     Env: JOBS (3000), CONCURRENCY (32), WORKERS (2), BIG_JOBS (60), BIG_IMAGE,
#                             S3_LATENCY_MS (20)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-3000}"
CONCURRENCY="${CONCURRENCY:-32}"
WORKERS="${WORKERS:-2}"
BIG_JOBS="${BIG_JOBS:-60}"
S3_LATENCY_MS="${S3_LATENCY_MS:-20}"
BIG_IMAGE="${BIG_IMAGE:-../shared/corpus/photos/volna-5120x2880.jpg}"
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
  for d in "$db" "${db}_s3" "${db}_s3_slow" "${db}_big" "${db}_big_s3"; do
    psql "$SERVER" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

profile() { # label data-dir database loadgen-args -- [pixmesh flags] ; prints the loadgen's JSON
  local label="$1" dir="$2" database="$3" load="$4"
  shift 5
  mkdir -p "$dir"
  # The same images are uploaded again and again: with the result cache off, each is work.
  RUST_LOG=warn "$T/pixmesh" --database "$database" "$@" up --data-dir "$dir" --listen 127.0.0.1:0 --workers "$WORKERS" \
    --set log.level=warn --set upload.cache=off --set gateway.rate=off >"$dir/up.out" 2>"$dir/up.err" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$dir/up.out" 2>/dev/null && break; sleep 0.5; done
  local gateway distributor
  read -r gateway distributor < <(python3 -c 'import json,sys
gateway, distributor = "", ""
for l in open(sys.argv[1]):
    try: v=json.loads(l)
    except Exception: continue
    if v.get("pixmesh")=="ready": gateway=v["gateway"]
    if v.get("pixmesh")=="listening" and v.get("name")=="distributor": distributor=v["pid"]
print(gateway, distributor)' "$dir/up.out")
  [ -n "$gateway" ] || { echo "$label: pixmesh up did not become ready" >&2; cat "$dir/up.err" >&2; exit 1; }
  # shellcheck disable=SC2086
  "$T/pixmesh-loadgen" e2e --gateway "http://$gateway" --key "$(cat "$dir/dev-api-key")" --database "$database" \
    --data-dir "$dir" --watch-pid "$distributor" $load
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

# The S3 server: s3s-fs with signature checks, on an ephemeral port; its key pair goes to the
# pixmesh processes of profile (c) through AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
"$T/pixmesh-loadgen" s3-server >"$work/s3.json" 2>"$work/s3.err" &
pids+=("$!")
for _ in $(seq 1 50); do [ -s "$work/s3.json" ] && break; sleep 0.1; done
read -r S3_ENDPOINT S3_KEY S3_SECRET < <(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(v["endpoint"], v["access_key"], v["secret_key"])' "$work/s3.json")
s3() { AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" "$@"; }
# A second one that answers every request S3_LATENCY_MS late (its own key pair).
"$T/pixmesh-loadgen" s3-server --latency-ms "$S3_LATENCY_MS" >"$work/s3-slow.json" 2>"$work/s3-slow.err" &
pids+=("$!")
for _ in $(seq 1 50); do [ -s "$work/s3-slow.json" ] && break; sleep 0.1; done
read -r SLOW_ENDPOINT SLOW_KEY SLOW_SECRET < <(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(v["endpoint"], v["access_key"], v["secret_key"])' "$work/s3-slow.json")
s3_slow() { AWS_ACCESS_KEY_ID="$SLOW_KEY" AWS_SECRET_ACCESS_KEY="$SLOW_SECRET" "$@"; }

tiny="--jobs $JOBS --concurrency $CONCURRENCY"
big="--jobs $BIG_JOBS --concurrency 8 --image $BIG_IMAGE --query width=1920&format=jpeg"

echo "== (a) embedded: SQLite, local blobs, pixmesh's registry"
a="$(profile embedded "$work/a" "sqlite:$work/a/pixmesh.db" "$tiny" --)"
echo "  $a"
echo "== (b) PostgreSQL + NATS (wake-ups, events, KV registry), local blobs"
psql "$SERVER" -qc "CREATE DATABASE $db" >/dev/null
b="$(profile engines "$work/b" "${SERVER%/*}/$db" "$tiny" -- --queue "$NATS/benche2e$$" --registry "$NATS/benche2e$$")"
echo "  $b"
echo "== (c) PostgreSQL + NATS + S3 (presigned URLs for the workers)"
psql "$SERVER" -qc "CREATE DATABASE ${db}_s3" >/dev/null
c="$(s3 profile engines-s3 "$work/c" "${SERVER%/*}/${db}_s3" "$tiny" -- --queue "$NATS/benche2es$$" --registry "$NATS/benche2es$$" \
  --blobs "s3://pixmesh/bench-c?endpoint=$S3_ENDPOINT&region=us-east-1")"
echo "  $c"
echo "== (d) PostgreSQL + NATS + S3 answering every request $S3_LATENCY_MS ms late"
psql "$SERVER" -qc "CREATE DATABASE ${db}_s3_slow" >/dev/null
d="$(s3_slow profile engines-s3-slow "$work/d" "${SERVER%/*}/${db}_s3_slow" "$tiny" -- --queue "$NATS/benche2ed$$" --registry "$NATS/benche2ed$$" \
  --blobs "s3://pixmesh/bench-d?endpoint=$SLOW_ENDPOINT&region=us-east-1")"
echo "  $d"
echo "== distributor CPU per job, $BIG_JOBS x $(du -h "$BIG_IMAGE" | cut -f1) images: (b) bytes through the distributor"
psql "$SERVER" -qc "CREATE DATABASE ${db}_big" >/dev/null
bb="$(profile big "$work/bb" "${SERVER%/*}/${db}_big" "$big" -- --queue "$NATS/benchbig$$" --registry "$NATS/benchbig$$")"
echo "  $bb"
echo "== distributor CPU per job, the same images: (c) presigned URLs, bytes between workers and S3"
psql "$SERVER" -qc "CREATE DATABASE ${db}_big_s3" >/dev/null
cb="$(s3 profile big-s3 "$work/cb" "${SERVER%/*}/${db}_big_s3" "$big" -- --queue "$NATS/benchbigs$$" --registry "$NATS/benchbigs$$" \
  --blobs "s3://pixmesh/bench-big?endpoint=$S3_ENDPOINT&region=us-east-1")"
echo "  $cb"
python3 - "$S3_LATENCY_MS" "$a" "$b" "$c" "$d" "$bb" "$cb" <<'PY'
import json, sys
latency = sys.argv[1]
a, b, c, d, bb, cb = (json.loads(x) for x in sys.argv[2:])
print("\nsummary (same run, same machine):")
print("  tiny images, end to end:")
print(f"    embedded:               {a['jobs_per_second']:6.0f} jobs/s (uploads {a['uploads_per_second']:.0f}/s)")
print(f"    PostgreSQL + NATS:      {b['jobs_per_second']:6.0f} jobs/s (uploads {b['uploads_per_second']:.0f}/s)"
      f" = {b['jobs_per_second'] / a['jobs_per_second']:.2f}x the embedded profile")
print(f"    PostgreSQL + NATS + S3: {c['jobs_per_second']:6.0f} jobs/s (uploads {c['uploads_per_second']:.0f}/s)"
      f" = {c['jobs_per_second'] / a['jobs_per_second']:.2f}x the embedded profile")
print(f"    the same, S3 at +{latency} ms: {d['jobs_per_second']:6.0f} jobs/s (uploads {d['uploads_per_second']:.0f}/s)"
      f" = {d['jobs_per_second'] / a['jobs_per_second']:.2f}x the embedded profile")
print(f"  {bb['image_bytes'] / 1e6:.1f} MB images, the distributor's CPU per job:")
print(f"    bytes over gRPC (local blobs): {bb['watched_cpu_ms_per_job']:6.2f} ms/job ({bb['jobs_per_second']:.1f} jobs/s)")
print(f"    presigned URLs (S3):           {cb['watched_cpu_ms_per_job']:6.2f} ms/job ({cb['jobs_per_second']:.1f} jobs/s)"
      f" = {cb['watched_cpu_ms_per_job'] / max(bb['watched_cpu_ms_per_job'], 1e-9):.2f}x")
PY
