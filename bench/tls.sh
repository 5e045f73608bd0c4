#!/usr/bin/env bash
# What `pixmesh up --tls` costs: the whole system through its gateway, plaintext against mTLS on
# every hop between roles (and HTTPS on the gateway), same binary, same machine, same run,
# embedded profile (SQLite, local blobs, pixmesh's registry):
#
# 1. Throughput with tiny images (16x16 PNG -> 8 px wide PNG): `JOBS` uploads by `CONCURRENCY`
#    clients over keep-alive connections, timed until the job store says every job ended.
# 2. Multi-MB images (`BIG_IMAGE`, resized to 1920 px wide JPEG; `BIG_JOBS` of them): the bytes
#    cross four TLS hops (client -> gateway -> upload, distributor -> worker and back); jobs/s and
#    the distributor's CPU time per job (read from /proc).
# Each profile runs `ROUNDS` times, alternating; the medians are compared.
#
# Usage: bench/tls.sh     Env: JOBS (2000), CONCURRENCY (32), WORKERS (2), BIG_JOBS (40), BIG_IMAGE,
#                             ROUNDS (2)
JOBS="${JOBS:-2000}"
CONCURRENCY="${CONCURRENCY:-32}"
WORKERS="${WORKERS:-2}"
BIG_JOBS="${BIG_JOBS:-40}"
ROUNDS="${ROUNDS:-2}"
BIG_IMAGE="${BIG_IMAGE:-../shared/corpus/photos/volna-5120x2880.jpg}"
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" pixmesh pixmesh-loadgen

run() { # label load-args [--tls] ; prints the loadgen's JSON
  local label="$1" load="$2" dir="$work/$1"
  shift 2
  rm -rf "$dir" && mkdir -p "$dir"
  # The same images again and again: with the result cache off, each is work.
  RUST_LOG=warn "$T/pixmesh" up --data-dir "$dir" --listen 127.0.0.1:0 --workers "$WORKERS" "$@" \
    --set log.level=warn --set upload.cache=off --set gateway.rate=off >"$dir/up.out" 2>"$dir/up.err" &
  local pid=$!
  track "$pid"
  for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$dir/up.out" 2>/dev/null && break; sleep 0.5; done
  local url distributor ca
  read -r url distributor ca < <(python3 -c 'import json,sys
url, distributor, ca = "", "", "-"
for l in open(sys.argv[1]):
    try: v=json.loads(l)
    except Exception: continue
    if v.get("pixmesh")=="ready": url, ca = v["url"], v.get("ca", "-")
    if v.get("pixmesh")=="listening" and v.get("name")=="distributor": distributor=v["pid"]
print(url, distributor, ca)' "$dir/up.out")
  [ -n "$url" ] || { echo "$label: pixmesh up did not become ready" >&2; cat "$dir/up.err" >&2; exit 1; }
  local trust=()
  [ "$ca" = "-" ] || trust=(--ca "$ca")
  # shellcheck disable=SC2086
  "$T/pixmesh-loadgen" e2e --gateway "$url" --key "$(cat "$dir/dev-api-key")" --database "sqlite:$dir/pixmesh.db" \
    --data-dir "$dir" --watch-pid "$distributor" "${trust[@]}" $load
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

tiny="--jobs $JOBS --concurrency $CONCURRENCY"
big="--jobs $BIG_JOBS --concurrency 8 --image $BIG_IMAGE --query width=1920&format=jpeg"
results="$work/results.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  for profile in plain tls; do
    flags=()
    [ "$profile" = tls ] && flags=(--tls)
    echo "== round $round, $profile: tiny images"
    run "$profile-tiny" "$tiny" "${flags[@]}" >"$work/out.json"
    out="$(cat "$work/out.json")"
    echo "  $out"
    echo "{\"profile\":\"$profile\",\"kind\":\"tiny\",\"r\":$out}" >>"$results"
    echo "== round $round, $profile: $BIG_JOBS x $(du -h "$BIG_IMAGE" | cut -f1) images"
    run "$profile-big" "$big" "${flags[@]}" >"$work/out.json"
    out="$(cat "$work/out.json")"
    echo "  $out"
    echo "{\"profile\":\"$profile\",\"kind\":\"big\",\"r\":$out}" >>"$results"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(profile, kind, key):
    return statistics.median(r["r"][key] for r in rows if r["profile"] == profile and r["kind"] == kind)
print("\nsummary (same run, same machine, medians):")
for kind, label in (("tiny", "tiny images"), ("big", "multi-MB images")):
    p, t = med("plain", kind, "jobs_per_second"), med("tls", kind, "jobs_per_second")
    print(f"  {label}: plaintext {p:7.1f} jobs/s, up --tls {t:7.1f} jobs/s = {t / p:.2f}x")
    pc, tc = med("plain", kind, "watched_cpu_ms_per_job"), med("tls", kind, "watched_cpu_ms_per_job")
    print(f"    the distributor's CPU per job: plaintext {pc:.2f} ms, up --tls {tc:.2f} ms (+{tc - pc:.2f} ms)")
PY
