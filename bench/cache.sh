#!/usr/bin/env bash
# The result cache: a hit against a miss of the same 12 MP upload, on the embedded profile
# (`pixmesh up`: SQLite, local blobs), same binary, same machine, same run.
#
# The input is a 12 MP photo (the corpus's `volna-5120x2880.jpg` resized to 4608x2592 by the
# system itself, JPEG q90), asked for as `width=800&format=webp`. Each round makes one miss and
# one hit, in alternating order, one at a time, each timed by the client from the start of its
# upload until it holds the job succeeded:
#   - miss: the same bytes with `Cache-Control: no-cache` (the cache is not read: a worker makes
#     it), then the job's event stream (`/api/status/{id}/events`) until its `succeeded` event;
#   - hit: the upload's answer (`Cache-Status: pixmesh; hit`: the job is created succeeded),
#     then one `GET /api/status/{id}` that says `succeeded`;
#   - hit by digest: the same, the upload naming its image by `Repr-Digest` (RFC 9530) with no
#     body, as a client that uploaded it before does (`412 not_cached` would say: send it).
# Every request goes through the gateway with the API key, on kept-alive connections. Also
# counts the images the workers processed (`pixmesh_worker_images_total`) across the hits.
# Prints the medians, miss/hit for both kinds of hit (target: at least 50, with 0 worker
# calls for the hits), and what the hit with the image costs beyond its upload: a `no-store`
# upload of the same bytes (answered 202 before any work; no cache read).
#
# Usage: bench/cache.sh     Env: ROUNDS (15), WORKERS (2), QUERY, PHOTO
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-15}"
WORKERS="${WORKERS:-2}"
QUERY="${QUERY:-width=800&format=webp}"
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

RUST_LOG=warn "$T/pixmesh" up --data-dir "$work" --listen 127.0.0.1:0 --workers "$WORKERS" \
  --set log.level=warn --set gateway.rate=off --set gateway.access_log=false --set upload.cache=key >"$work/up.out" 2>"$work/up.err" &
pid=$!
for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$work/up.out" 2>/dev/null && break; sleep 0.5; done
grep -q '"pixmesh":"ready"' "$work/up.out" || { echo "pixmesh up did not become ready" >&2; cat "$work/up.err" >&2; exit 1; }

python3 - "$work/up.out" "$work/dev-api-key" "$PHOTO" "$ROUNDS" "$QUERY" <<'PY'
import base64, hashlib, http.client, json, statistics, sys, time, urllib.request

lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ready = next(l for l in lines if l.get("pixmesh") == "ready")
workers = [l["admin"] for l in lines if l.get("pixmesh") == "listening" and l.get("role") == "worker"]
host, port = ready["gateway"].split(":")
key = open(sys.argv[2]).read().strip()
photo, rounds, query = sys.argv[3], int(sys.argv[4]), sys.argv[5]
conn = http.client.HTTPConnection(host, int(port), timeout=120)

def call(method, path, body=None, headers=None):
    h = {"X-API-KEY": key, **(headers or {})}
    conn.request(method, path, body=body, headers=h)
    res = conn.getresponse()
    return res, res.read()

def worker_images():
    total = 0.0
    for admin in workers:
        text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
        total += sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("pixmesh_worker_images_total"))
    return total

def settle(job):
    while json.loads(call("GET", f"/api/status/{job}")[1])["state"] not in ("succeeded", "failed"):
        time.sleep(0.05)

# The 12 MP input, made by the system from the corpus photo.
res, body = call("POST", "/api/upload?width=4608&format=jpeg&quality=90", open(photo, "rb").read(), {"Content-Type": "image/jpeg"})
big = json.loads(body)["id"]
settle(big)
image = call("GET", f"/api/result/{big}")[1]

def miss():
    t = time.perf_counter()
    res, body = call("POST", f"/api/upload?{query}", image, {"Content-Type": "image/jpeg", "Cache-Control": "no-cache"})
    assert res.status == 202 and res.getheader("Cache-Status") == "pixmesh; fwd=request; stored", (res.status, body)
    job = json.loads(body)["id"]
    # The job's stream ends after its terminal event.
    res, stream = call("GET", f"/api/status/{job}/events", headers={"Accept": "text/event-stream"})
    elapsed = time.perf_counter() - t
    assert b"event: succeeded" in stream, stream[-300:]
    return elapsed * 1000

def hit(by_digest=False):
    # By digest: no body, the image named by its SHA-256.
    body, headers = (b"", {"Repr-Digest": digest}) if by_digest else (image, {})
    t = time.perf_counter()
    res, answer = call("POST", f"/api/upload?{query}", body, {"Content-Type": "image/jpeg", **headers})
    assert res.status == 202 and res.getheader("Cache-Status") == "pixmesh; hit", (res.status, res.getheader("Cache-Status"), answer)
    job = json.loads(answer)["id"]
    status = json.loads(call("GET", f"/api/status/{job}")[1])
    elapsed = time.perf_counter() - t
    assert status["state"] == "succeeded" and status.get("cached_from"), status
    return elapsed * 1000

def upload_only():
    t = time.perf_counter()
    res, body = call("POST", f"/api/upload?{query}", image, {"Content-Type": "image/jpeg", "Cache-Control": "no-store"})
    elapsed = time.perf_counter() - t
    assert res.status == 202, body
    settle(json.loads(body)["id"])
    return elapsed * 1000

digest = "sha-256=:" + base64.b64encode(hashlib.sha256(image).digest()).decode() + ":"
print(f"input: 4608x2592 JPEG, {len(image) / 1e6:.1f} MB, asked for as {query}; {rounds} rounds, one upload at a time")
miss(); hit()  # warm-up: the entry is made
misses, hits, by_digest, uploads, hit_calls = [], [], [], [], 0.0
def hits_counted():
    global hit_calls
    before = worker_images()
    hits.append(hit())
    by_digest.append(hit(by_digest=True))
    hit_calls += worker_images() - before
for r in range(rounds):
    if r % 2 == 0:
        misses.append(miss())
        hits_counted()
    else:
        hits_counted()
        misses.append(miss())
    uploads.append(upload_only())
m, h, d, u = (statistics.median(x) for x in (misses, hits, by_digest, uploads))
print(f"  miss:                  median {m:7.1f} ms  (min {min(misses):.1f}, max {max(misses):.1f})")
print(f"  hit, with the image:   median {h:7.1f} ms  (min {min(hits):.1f}, max {max(hits):.1f})")
print(f"  hit, by digest:        median {d:7.1f} ms  (min {min(by_digest):.1f}, max {max(by_digest):.1f})")
print(f"  the upload alone (202 of a no-store upload of the same bytes): median {u:.1f} ms")
print(f"  worker calls made for the {2 * rounds} hits: {hit_calls:.0f}")
print(f"miss / hit with the image: {m / h:.1f}x; miss / hit by digest: {m / d:.1f}x (target >= 50)")
PY
