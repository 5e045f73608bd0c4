#!/usr/bin/env bash
# A job with three named outputs against each of its outputs alone, on the embedded profile
# (`pixmesh up`: SQLite, local blobs), same binary, same machine, same run.
#
# The input is a 12 MP photo (the corpus's `volna-5120x2880.jpg` resized to 4608x2592 by the
# system itself, JPEG q90). Each round uploads, one at a time, the three single-output jobs
# and the 3-output job (`outputs=thumb:…;medium:…;large:…`), in a rotating order, and reads each
# job's time from its own history: from its `accepted` event to its `succeeded` event (the
# HLC wall-clock times of the events, written by the upload service and the distributor).
# Prints the medians and the 3-output job's median as a ratio of the slowest single output's:
# at or under 1.3 means the steps really ran side by side.
#
# Usage: bench/saga.sh     Env: ROUNDS (7), WORKERS (2), CAPACITY (2, per worker), PHOTO
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-7}"
WORKERS="${WORKERS:-2}"
CAPACITY="${CAPACITY:-2}"
PHOTO="${PHOTO:-../shared/corpus/photos/volna-5120x2880.jpg}"
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

# The same images are uploaded again and again: with the result cache off, each is work.
RUST_LOG=warn "$T/pixmesh" up --data-dir "$work" --listen 127.0.0.1:0 --workers "$WORKERS" \
  --set log.level=warn --set upload.cache=off --set gateway.rate=off --set "worker.capacity=$CAPACITY" >"$work/up.out" 2>"$work/up.err" &
pid=$!
for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$work/up.out" 2>/dev/null && break; sleep 0.5; done
grep -q '"pixmesh":"ready"' "$work/up.out" || { echo "pixmesh up did not become ready" >&2; cat "$work/up.err" >&2; exit 1; }

python3 - "$work/up.out" "$work/dev-api-key" "$PHOTO" "$ROUNDS" <<'PY'
import json, statistics, sys, time, urllib.request

ready = next(json.loads(l) for l in open(sys.argv[1]) if '"ready"' in l)
gateway = "http://" + ready["gateway"]
key = open(sys.argv[2]).read().strip()
photo, rounds = sys.argv[3], int(sys.argv[4])

def call(method, path, body=None, content_type=None):
    req = urllib.request.Request(gateway + path, data=body, method=method, headers={"X-API-KEY": key})
    if content_type:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=120) as res:
        return res.read()

def run(query, image):
    job = json.loads(call("POST", "/api/upload?" + query, image, "image/jpeg"))["id"]
    while True:
        status = json.loads(call("GET", f"/api/status/{job}"))
        if status["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.01)
    if status["state"] != "succeeded":
        sys.exit(f"{query}: {status}")
    events = json.loads(call("GET", f"/api/status/{job}/history"))["events"]
    ms = lambda e: int(e["hlc"]) * 1000 // 2**32
    return ms(events[-1]) - ms(events[0])

# The 12 MP input, made by the system from the corpus photo.
big = json.loads(call("POST", "/api/upload?width=4608&format=jpeg&quality=90", open(photo, "rb").read(), "image/jpeg"))["id"]
while json.loads(call("GET", f"/api/status/{big}"))["state"] not in ("succeeded", "failed"):
    time.sleep(0.05)
image = call("GET", f"/api/result/{big}")
outputs = {"thumb": "width=200,format=webp", "medium": "width=800,format=jpeg", "large": "width=1600,format=webp"}
cases = {name: opts.replace(",", "&") for name, opts in outputs.items()}
cases["3 outputs"] = "outputs=" + ";".join(f"{n}:{o}" for n, o in outputs.items())
print(f"input: 4608x2592 JPEG, {len(image) / 1e6:.1f} MB; {rounds} rounds, one job at a time")
run(cases["large"], image)  # warm-up
times = {name: [] for name in cases}
names = list(cases)
for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        times[name].append(run(cases[name], image))
med = {name: statistics.median(t) for name, t in times.items()}
for name, t in times.items():
    print(f"  {name:10s} median {med[name]:6.0f} ms  (runs: {', '.join(str(x) for x in t)})")
slowest = max(med[n] for n in outputs)
print(f"3-output job / slowest single output: {med['3 outputs'] / slowest:.2f}x (target <= 1.3)")
print(f"3-output job / sum of the single outputs: {med['3 outputs'] / sum(med[n] for n in outputs):.2f}x")
PY
