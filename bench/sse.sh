#!/usr/bin/env bash
# Live status over SSE through the gateway, on the embedded profile (`pixmesh up`), same binary,
# same machine, same run:
#
# 1. First event: `ROUNDS` uploads one after another; right after each upload's 202 the client
#    opens `GET /api/status/{id}/events` and times the first event (`accepted`) from the 202.
# 2. Held streams: `STREAMS` clients open `GET /api/events` at once and stay; the gateway's RSS
#    (from /proc) before and with them open gives the memory they cost; an upload made while
#    they are open must still go through (streams do not take the route's request slots).
#
# Usage: bench/sse.sh     Env: ROUNDS (200), STREAMS (1000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-200}"
STREAMS="${STREAMS:-1000}"
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
RUST_LOG=warn "$T/pixmesh" up --data-dir "$work" --listen 127.0.0.1:0 --workers 2 \
  --set log.level=warn --set upload.cache=off --set gateway.rate=off --set gateway.access_log=false >"$work/up.out" 2>"$work/up.err" &
pid=$!
for _ in $(seq 1 120); do grep -q '"pixmesh":"ready"' "$work/up.out" 2>/dev/null && break; sleep 0.5; done
grep -q '"pixmesh":"ready"' "$work/up.out" || { echo "pixmesh up did not become ready" >&2; cat "$work/up.err" >&2; exit 1; }

python3 - "$work/up.out" "$work/dev-api-key" "$ROUNDS" "$STREAMS" <<'PY'
import asyncio, json, statistics, sys, time, urllib.request, zlib, struct

lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ready = next(v for v in lines if v.get("pixmesh") == "ready")
gateway_pid = next(v["pid"] for v in lines if v.get("pixmesh") == "listening" and v.get("name") == "gateway")
status_pid = next(v["pid"] for v in lines if v.get("pixmesh") == "listening" and v.get("name") == "status")
host, port = ready["gateway"].rsplit(":", 1)
port = int(port)
key = open(sys.argv[2]).read().strip()
rounds, streams = int(sys.argv[3]), int(sys.argv[4])

def png(w, h):
    raw = b"".join(b"\0" + bytes((x + y) % 256 for x in range(w)) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
image = png(16, 16)

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

async def request(method, path, body=b"", accept=None):
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-API-KEY: {key}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: image/png\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    status = (await reader.readline()).decode()
    headers = {}
    while (line := (await reader.readline()).decode().strip()):
        k, v = line.split(":", 1)
        headers[k.lower()] = v.strip()
    return int(status.split()[1]), headers, reader, writer

async def upload():
    status, headers, reader, writer = await request("POST", "/api/upload?width=8&format=png", image)
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    assert status == 202, (status, body)
    return json.loads(body)["id"]

async def first_event(job, accepted_at):
    status, headers, reader, writer = await request("GET", f"/api/status/{job}/events", accept="text/event-stream")
    assert status == 200, status
    while True:
        line = await reader.readline()
        if line.startswith(b"data:"):
            writer.close()
            return time.perf_counter() - accepted_at

async def main():
    # 1. The first event after the 202.
    waits = []
    for _ in range(rounds):
        job = await upload()
        accepted = time.perf_counter()
        waits.append(await first_event(job, accepted) * 1000)
    waits.sort()
    p = lambda q: waits[min(len(waits) - 1, int(q * len(waits)))]
    print(f"first event after the upload's 202: median {statistics.median(waits):.1f} ms, p90 {p(0.9):.1f} ms, "
          f"p99 {p(0.99):.1f} ms, max {waits[-1]:.1f} ms over {rounds} uploads (target: within 50 ms)")

    # 2. Streams held open.
    await asyncio.sleep(1)
    before_gw, before_status = rss_kb(gateway_pid), rss_kb(status_pid)
    held = []
    sem = asyncio.Semaphore(100)
    async def open_one():
        async with sem:
            status, headers, reader, writer = await request("GET", "/api/events", accept="text/event-stream")
            assert status == 200, status
            held.append((reader, writer))
    started = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(streams)))
    opened = time.perf_counter() - started
    # Every stream gets the events of a new upload.
    job = await upload()
    async def until_event(reader):
        while not (await reader.readline()).startswith(b"data:"):
            pass
    got = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(until_event(r) for r, _ in held)), 30)
    fanout = time.perf_counter() - got
    await asyncio.sleep(2)
    after_gw, after_status = rss_kb(gateway_pid), rss_kb(status_pid)
    # An upload while they are open.
    t = time.perf_counter()
    await upload()
    upload_ms = (time.perf_counter() - t) * 1000
    extra_gw = (after_gw - before_gw) / 1024
    print(f"{streams} streams open through the gateway in {opened:.2f} s; an event reached all of them within {fanout * 1000:.0f} ms")
    print(f"gateway RSS: {before_gw / 1024:.1f} MB before, {after_gw / 1024:.1f} MB with them: +{extra_gw:.1f} MB "
          f"({(after_gw - before_gw) / streams:.1f} KB a stream; target <= 64 MB)")
    print(f"status RSS: {before_status / 1024:.1f} MB before, {after_status / 1024:.1f} MB with them: +{(after_status - before_status) / 1024:.1f} MB")
    print(f"an upload with them open: {upload_ms:.1f} ms")
    for _, w in held:
        w.close()

asyncio.run(main())
PY
