#!/usr/bin/env bash
# `pixmesh submit` against a plain parallel curl loop: 200 photos each through the same
# system (embedded profile, `pixmesh up`), same binary, same run, alternating.
#
# The photos: the corpus's `ladybird-2560x1600.jpg` (351 KB), 200 times, each with a comment
# segment of its own, fresh for each side of each round (so every upload is new work), asked
# for as `width=800&format=webp`. Each side is timed from its first
# upload until every job has succeeded:
#   - curl: `xargs -P JOBS curl --data-binary @photo …` for the uploads, then the jobs' status
#     polled until each has ended (the results are not downloaded);
#   - submit: `pixmesh submit DIR -j JOBS -o OUT` (it also follows each job on its SSE stream
#     and downloads every result).
# Prints each side's files/s and submit / curl (target: at least 0.9).
#
# Usage: bench/submit.sh     Env: ROUNDS (2), JOBS (8), WORKERS (2), PHOTO
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-2}"
JOBS="${JOBS:-8}"
WORKERS="${WORKERS:-2}"
PHOTO="${PHOTO:-../shared/corpus/photos/ladybird-2560x1600.jpg}"
QUERY="width=800&format=webp"
cargo build --release -q -p pixmesh
T="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 200 photos of their own for each side of each round: every upload is new work (no result
# cache hit, and no idempotent replay of an earlier run's job for submit).
make_photos() {
  python3 - "$PHOTO" "$work/photos-$1" "$1" <<'PY'
import os, struct, sys
photo, out, tag = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(photo, "rb").read()
assert data[:2] == b"\xff\xd8", "not a JPEG"
os.makedirs(out)
for i in range(200):
    text = f"pixmesh bench photo {tag} {i}".encode()
    comment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    open(os.path.join(out, f"photo-{i:03d}.jpg"), "wb").write(data[:2] + comment + data[2:])
PY
}

# The result cache is off: the two sides upload the same image with other comments.
RUST_LOG=warn "$T/pixmesh" up --data-dir "$work/data" --listen 127.0.0.1:0 --workers "$WORKERS" \
  --set log.level=warn --set upload.cache=off --set gateway.rate=off --set gateway.access_log=false >"$work/up.out" 2>"$work/up.err" &
pid=$!
for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$work/up.out" 2>/dev/null && break; sleep 0.5; done
grep -q '"pixmesh":"ready"' "$work/up.out" || { echo "pixmesh up did not become ready" >&2; cat "$work/up.err" >&2; exit 1; }
gateway="http://$(grep '"pixmesh":"ready"' "$work/up.out" | sed -E 's/.*"gateway":"([^"]+)".*/\1/')"
key="$(cat "$work/data/dev-api-key")"

curl_side() {
  local ids="$work/ids-$1"
  local start end
  make_photos "curl-$1"
  start=$(date +%s.%N)
  find "$work/photos-curl-$1" -name '*.jpg' -print0 | xargs -0 -P "$JOBS" -I{} \
    curl -sS -H "X-API-KEY: $key" -H 'Content-Type: image/jpeg' --data-binary @{} "$gateway/api/upload?$QUERY" >"$ids"
  python3 - "$gateway" "$key" "$ids" <<'PY'
import json, re, sys, time, urllib.request
gateway, key, ids = sys.argv[1], sys.argv[2], re.findall(r'"id":"([^"]+)"', open(sys.argv[3]).read())
assert len(ids) == 200, len(ids)
for job in ids:
    while True:
        req = urllib.request.Request(f"{gateway}/api/status/{job}", headers={"X-API-KEY": key})
        state = json.loads(urllib.request.urlopen(req).read())["state"]
        if state in ("succeeded", "failed"):
            assert state == "succeeded", job
            break
        time.sleep(0.02)
PY
  end=$(date +%s.%N)
  python3 -c "print(f'{200 / ($end - $start):.1f}')"
}

submit_side() {
  local start end
  make_photos "submit-$1"
  start=$(date +%s.%N)
  "$T/pixmesh" submit "$work/photos-submit-$1" --url "$gateway" --key "$key" -q "$QUERY" -j "$JOBS" -o "$work/out-$1" >"$work/submit-$1.out"
  end=$(date +%s.%N)
  [ "$(find "$work/out-$1" -name '*.webp' | wc -l)" -eq 200 ] || { echo "submit wrote $(find "$work/out-$1" -name '*.webp' | wc -l) results" >&2; exit 1; }
  python3 -c "print(f'{200 / ($end - $start):.1f}')"
}

echo "200 photos (2560x1600 JPEG, 351 KB) as $QUERY; $JOBS in flight; $WORKERS workers; $ROUNDS rounds"
curl_rates=()
submit_rates=()
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then
    curl_rates+=("$(curl_side "$round")"); submit_rates+=("$(submit_side "$round")")
  else
    submit_rates+=("$(submit_side "$round")"); curl_rates+=("$(curl_side "$round")")
  fi
  echo "  round $round: curl ${curl_rates[-1]} files/s, submit ${submit_rates[-1]} files/s"
done
python3 - "${curl_rates[*]}" "${submit_rates[*]}" <<'PY'
import statistics, sys
c = [float(x) for x in sys.argv[1].split()]
s = [float(x) for x in sys.argv[2].split()]
print(f"median: curl loop {statistics.median(c):.1f} files/s, pixmesh submit {statistics.median(s):.1f} files/s; "
      f"submit / curl: {statistics.median(s) / statistics.median(c):.2f} (target >= 0.9)")
PY
grep "pixmesh submit:" "$work/submit-1.out"
