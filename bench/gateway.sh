#!/usr/bin/env bash
# Gateway benchmark: nginx and the pixmesh gateway in front of the same upstream (one nginx
# worker answering a tiny body), same wrk settings, same run; then the upload flood.
#
# A third row is the floor of any proxy built on hyper: `pixmesh-loadgen bare-proxy`, hyper's
# server and pooled client with nothing in between.
#
# Prints, per proxy: req/s (wrk -t1 -c50 -d10s, keep-alive), CPU per request (user+sys of the
# proxy's processes / requests), p50/p99 at a fixed 2,000 req/s (open loop, pixmesh-loadgen)
# and the p99 added over going direct, RSS after 10 s at 10,000 req/s; and the ratios
# pixmesh / nginx. pixmesh runs with API key + per-key rate limit + metrics on; nginx with none.
#
# Flood: 200 clients POST 30 MB uploads whose header says 7680×4320 (half Content-Length, half
# chunked) for 10 s while legitimate 200 KB uploads run at 50/s; reports the refusal time after
# the header bytes, the bytes that reached the upstream, the gateway's peak RSS, and the
# legitimate uploads' p99 against a run without the flood.
#
# Overload: nginx and pixmesh each at 1.5× its own knee, open loop for SECONDS_PER_RUN. The knee
# is found in the same run, per proxy, by an open-loop sweep (2 s per rate, rates rising by about
# a third from 1,000 req/s): the highest rate whose served p99 stays within 10× (and 25 ms of) the
# p99 at the lowest rate, with under 1 % failed and the load generator itself on time (wrk's
# closed-loop req/s is not a knee: an open-loop load at 1.5× that measures only the load
# generator starving on two cores). Reported: p99 of the requests served, the share
# refused (an HTTP answer other than 2xx/3xx) and the share failed (no answer: refused or reset
# connections, timeouts), and the time to first byte of a refusal. pixmesh runs here with its
# default admission and upstream limits (max_in_flight 256 + a queue of 128 for 100 ms per
# route, 1024 connections per instance, ejections capped at 50 % and never the last instance),
# and with limits sized for this upstream (pixmesh-64).
# A proxy that fails requests is reported, never a reason for the script to stop: every row
# also shows its failed share.
#
# Usage: bench/gateway.sh
# Env: SECONDS_PER_RUN (default 10), NGINX_WORKERS (default: cores), OVERLOAD_FACTOR (default 1.5),
#      PROFILE (cargo profile, default release; `dev` for a quick smoke run of the script itself)
set -euo pipefail
cd "$(dirname "$0")/.."

DUR="${SECONDS_PER_RUN:-10}"
NGINX_WORKERS="${NGINX_WORKERS:-$(nproc)}"
FACTOR="${OVERLOAD_FACTOR:-1.5}"
PROFILE="${PROFILE:-release}"
need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "installing nginx and wrk ..." >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

cargo build --profile "$PROFILE" -q -p pixmesh -p pixmesh-loadgen
# Where cargo put them (it knows its target directory, whatever set it).
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/px/nginx.pid" ] && kill "$(cat "$WORK/px/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# nginx with the server block in $2, in directory $1.
start_nginx() {
  local dir="$1" workers="$2" server="$3"
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<CONF
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  $server
}
CONF
  "$NGINX" -c "$dir/nginx.conf" -p "$dir" -g 'daemon on;' 2>>"$dir/error.log"
}

UP_PORT=$(free_port)
start_nginx "$WORK/up" 1 "server { listen 127.0.0.1:$UP_PORT; location / { return 200 'ok'; } }"
wait_port "$UP_PORT"

PX_PORT=$(free_port)
start_nginx "$WORK/px" "$NGINX_WORKERS" "upstream app { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server { listen 127.0.0.1:$PX_PORT; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
wait_port "$PX_PORT"

KEY="bench-key-$RANDOM$RANDOM"
# Starts a pixmesh gateway named $1 with the routes part $2 of its config, and the [gateway]
# settings $3 (default: no admission limit to speak of); sets GW_PID, GW_ADDR and GW_ADMIN.
start_gateway() {
  local name="$1" routes="$2" limits="${3-max_in_flight = 100000}"
  cat >"$WORK/$name.toml" <<CONF
[gateway]
listen = "127.0.0.1:0"
access_log = false
rate = "10000000/s"
burst = 1000000
$limits
$routes
CONF
  PIXMESH_API_KEY="$KEY" RUST_LOG=warn "$BIN/pixmesh" --config "$WORK/$name.toml" gateway >"$WORK/$name.out" 2>"$WORK/$name.err" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 100); do
    GW_ADDR=$(grep -o '"http":"[^"]*"' "$WORK/$name.out" 2>/dev/null | head -1 | cut -d'"' -f4 || true)
    GW_ADMIN=$(grep -o '"admin":"[^"]*"' "$WORK/$name.out" 2>/dev/null | head -1 | cut -d'"' -f4 || true)
    [ -n "$GW_ADDR" ] && return 0
    sleep 0.05
  done
  echo "gateway $name did not start:" >&2; cat "$WORK/$name.err" >&2; return 1
}
APP_ROUTES="[gateway.upstreams]
app = \"http://127.0.0.1:$UP_PORT\"
[[gateway.routes]]
prefix = \"/\"
upstream = \"app\""
start_gateway main "$APP_ROUTES"

# CPU ticks (user+sys) of a process and its children threads.
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
nginx_pids() { local m; m=$(cat "$WORK/px/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }
rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done; echo "$t"; }
HZ=$(getconf CLK_TCK)

# A field of a JSON document, or "-" when the document or the field is missing.
field() { python3 -c 'import json,sys
try:
    v = json.loads(sys.argv[1])
    for k in sys.argv[2].split("."): v = v[k]
    print(f"{v:.3f}" if isinstance(v, float) else v)
except Exception:
    print("-")' "$1" "$2"; }
# The failed share (refused + no answer) of a wrk run: non-2xx/3xx answers and socket errors
# over all requests.
wrk_failed() { python3 -c 'import re,sys
out = sys.argv[1]
m = re.search(r"(\d+) requests in", out); total = int(m.group(1)) if m else 0
non2xx = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
sock = sum(int(x) for x in m.groups()) if m else 0
print(f"{(non2xx + sock) / total:.4f}" if total else "-")' "$1"; }

declare -A RPS CPU P50 P99 RSS FAILED
measure() {
  local name="$1" url="$2" pids="$3" hdr=()
  [ "$name" = pixmesh ] && hdr=(-H "X-API-KEY: $KEY")
  wrk -t1 -c50 -d2s "${hdr[@]}" "$url" >/dev/null || true # warm-up
  local t0 t1 out
  t0=$( [ -n "$pids" ] && ticks $pids || echo 0)
  out=$(wrk -t1 -c50 -d"${DUR}s" "${hdr[@]}" "$url" || true)
  t1=$( [ -n "$pids" ] && ticks $pids || echo 0)
  RPS[$name]=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  RPS[$name]=${RPS[$name]:--}
  local total; total=$(echo "$out" | awk '/requests in/{print $1}')
  CPU[$name]=$(python3 -c "print(f'{($t1-$t0)/$HZ/$total*1e6:.1f}')" 2>/dev/null || echo -)
  FAILED[$name]="wrk $(wrk_failed "$out")"
  local keyarg=(); [ "$name" = pixmesh ] && keyarg=(--api-key "$KEY")
  out=$("$BIN/pixmesh-loadgen" rate "$url" --rps 2000 --seconds "$DUR" "${keyarg[@]}" || true)
  P50[$name]=$(field "$out" latency.p50_ms)
  P99[$name]=$(field "$out" latency.p99_ms)
  FAILED[$name]="${FAILED[$name]}, 2k/s $(field "$out" failed_share)"
  if [ -n "$pids" ]; then
    "$BIN/pixmesh-loadgen" rate "$url" --rps 10000 --seconds "$DUR" "${keyarg[@]}" >/dev/null || true
    RSS[$name]=$(python3 -c "print(f'{$(rss_kb $pids)/1024:.1f}')")
  else
    RSS[$name]=-
  fi
}

# The floor of any hyper-based proxy: hyper's server and pooled client with nothing between.
"$BIN/pixmesh-loadgen" bare-proxy --upstream "http://127.0.0.1:$UP_PORT" >"$WORK/bare.out" &
BARE_PID=$!
PIDS+=("$BARE_PID")
for _ in $(seq 100); do BARE=$(grep -o '"bare_proxy":"[^"]*"' "$WORK/bare.out" 2>/dev/null | cut -d'"' -f4 || true); [ -n "$BARE" ] && break; sleep 0.05; done

echo "measuring direct ..." >&2; measure direct "http://127.0.0.1:$UP_PORT/" ""
echo "measuring nginx ..." >&2; measure nginx "http://127.0.0.1:$PX_PORT/" "$(nginx_pids)"
echo "measuring pixmesh ..." >&2; measure pixmesh "http://$GW_ADDR/" "$GW_PID"
echo "measuring bare hyper ..." >&2; measure hyper "http://$BARE/" "$BARE_PID"

ratio() { python3 -c "a,b=$1,$2; print(f'{a/b:.2f}' if b else '-')" 2>/dev/null || echo -; }
added() { python3 -c "print(f'{$1-$2:.3f}')" 2>/dev/null || echo -; }
printf '\n%-8s %10s %10s %9s %9s %10s %8s  %s\n' proxy req/s cpu_us/req p50_ms p99_ms added_p99 rss_MB "failed share (wrk, 2k/s)"
for n in direct nginx pixmesh hyper; do
  a=-; [ "$n" != direct ] && a=$(added "${P99[$n]}" "${P99[direct]}")
  printf '%-8s %10s %10s %9s %9s %10s %8s  %s\n' "$n" "${RPS[$n]}" "${CPU[$n]}" "${P50[$n]}" "${P99[$n]}" "$a" "${RSS[$n]}" "${FAILED[$n]}"
done
echo "pixmesh/nginx: req/s $(ratio "${RPS[pixmesh]}" "${RPS[nginx]}"), cpu/req $(ratio "${CPU[pixmesh]}" "${CPU[nginx]}"), rss $(ratio "${RSS[pixmesh]}" "${RSS[nginx]}")"
echo "hyper (bare hyper server + client, no gateway features)/nginx: req/s $(ratio "${RPS[hyper]}" "${RPS[nginx]}"), cpu/req $(ratio "${CPU[hyper]}" "${CPU[nginx]}")"
echo "pixmesh/hyper: req/s $(ratio "${RPS[pixmesh]}" "${RPS[hyper]}"), cpu/req $(ratio "${CPU[pixmesh]}" "${CPU[hyper]}")"

# --- overload --------------------------------------------------------------------------------
# Each proxy at FACTOR × its own knee (wrk's req/s above). pixmesh twice, each in a gateway of
# its own (the one above has its admission limit lifted for the throughput rows): with its
# default limits, and with limits sized for this upstream (about knee × 8 ms in flight, a short
# queue), which bound the served requests' latency closer.
declare -A OVER OVER_NOTE KNEE
TUNED="max_in_flight = 64
max_queue = 64
max_queue_ms = 50"
# The open-loop knee of the proxy at $1 (extra loadgen arguments after it).
find_knee() {
  local url=$1; shift
  local base="" best=0 rate=1000 out p99 failed lag
  while [ "$rate" -le 200000 ]; do
    out=$("$BIN/pixmesh-loadgen" rate "$url" --rps "$rate" --seconds 2 --timeout-ms 5000 "$@" || true)
    p99=$(field "$out" latency.p99_ms); failed=$(field "$out" failed_share); lag=$(field "$out" send_lag_max_ms)
    [ -z "$base" ] && base=$p99
    if ! python3 -c 'import sys
p99, failed, lag, base = (float(x) if x not in ("-", "") else float("inf") for x in sys.argv[1:5])
sys.exit(0 if p99 <= max(10 * base, base + 25) and failed < 0.01 and lag < 25 else 1)' "$p99" "$failed" "$lag" "$base"; then
      break
    fi
    best=$rate
    rate=$(( rate * 4 / 3 / 100 * 100 ))
  done
  echo "$best"
}
for n in nginx pixmesh pixmesh-64; do
  url="http://127.0.0.1:$PX_PORT/"; keyarg=()
  if [ "$n" != nginx ]; then
    start_gateway "over-$n" "$APP_ROUTES" "$([ "$n" = pixmesh-64 ] && echo "$TUNED")"
    url="http://$GW_ADDR/"; keyarg=(--api-key "$KEY")
  fi
  echo "overload: finding $n's open-loop knee ..." >&2
  knee=$(find_knee "$url" "${keyarg[@]}")
  KNEE[$n]=$knee
  if [ "$knee" = 0 ]; then OVER[$n]=""; [ "$n" != nginx ] && kill "$GW_PID" 2>/dev/null; continue; fi
  echo "overload: $n at $FACTOR x $knee req/s ..." >&2
  OVER[$n]=$("$BIN/pixmesh-loadgen" overload "$url" --knee "$knee" --factor "$FACTOR" --seconds "$DUR" "${keyarg[@]}" || true)
  if [ "$n" != nginx ]; then
    m=$(curl -s "http://$GW_ADMIN/metrics" || true)
    sum() { echo "$m" | awk -v name="$1" 'index($0, name) == 1 && substr($0, length(name) + 1, 1) ~ /[{ ]/ {s += $NF} END {print s + 0}'; }
    OVER_NOTE[$n]="admission refusals $(sum pixmesh_gateway_admission_refused_total), waits for an upstream connection $(sum pixmesh_gateway_upstream_slot_waits_total), ejections $(sum pixmesh_gateway_upstream_ejections_total) (held back by the cap: $(sum pixmesh_gateway_upstream_ejections_capped_total))"
    kill "$GW_PID" 2>/dev/null || true
  fi
done
printf '\noverload at %s x each proxy'"'"'s own open-loop knee, %s s open loop (pixmesh-64: max_in_flight 64, max_queue 64, max_queue_ms 50)\n' "$FACTOR" "$DUR"
printf '%-11s %7s %9s %11s %11s %11s %10s %11s %11s %9s\n' proxy knee req/s served_p50 served_p99 refused_sh failed_sh refusal_p50 refusal_p99 send_lag
for n in nginx pixmesh pixmesh-64; do
  o="${OVER[$n]}"
  printf '%-11s %7s %9s %11s %11s %11s %10s %11s %11s %9s\n' "$n" "${KNEE[$n]:--}" "$(field "$o" rps)" "$(field "$o" latency.p50_ms)" "$(field "$o" latency.p99_ms)" \
    "$(field "$o" refused.share)" "$(field "$o" failed_share)" "$(field "$o" refused.ttfb.p50_ms)" "$(field "$o" refused.ttfb.p99_ms)" "$(field "$o" send_lag_max_ms)"
  echo "            statuses $(field "$o" statuses), no answer $(field "$o" error_kinds)${OVER_NOTE[$n]:+; }${OVER_NOTE[$n]:-}"
done
echo "(refused_sh: HTTP answers other than 2xx/3xx; failed_sh: those and requests without an answer; refusal_*: time to first byte of a refusal, from when it was due; send_lag: the load generator's own lateness)"

# --- flood -----------------------------------------------------------------------------------
SINK_OUT="$WORK/sink.out"
"$BIN/pixmesh-loadgen" sink >"$SINK_OUT" &
PIDS+=("$!")
for _ in $(seq 100); do SINK=$(grep -o '"sink":"[^"]*"' "$SINK_OUT" 2>/dev/null | cut -d'"' -f4 || true); [ -n "$SINK" ] && break; sleep 0.05; done
start_gateway flood "[gateway.upstreams]
upload = \"http://$SINK\"
status = \"http://$SINK\""
FLOOD_PID=$GW_PID
echo "flood: legitimate uploads alone ..." >&2
base=$("$BIN/pixmesh-loadgen" flood "$GW_ADDR" --clients 0 --seconds "$DUR" --legit-rps 50 --api-key "$KEY")
echo "flood: 200 clients with 30 MB 7680x4320 uploads ..." >&2
# The attackers run at the lowest CPU priority: on a real deployment their CPU is not ours, and
# on this 2-core machine 200 clients writing as fast as they can would otherwise measure the
# load generator's own scheduling. The legitimate uploads run in their own process, at normal
# priority.
nice -n 19 "$BIN/pixmesh-loadgen" flood "$GW_ADDR" --clients 200 --seconds "$DUR" --legit-rps 0 --api-key "$KEY" >"$WORK/attack.json" &
ATTACK=$!
sleep 0.5
fl=$("$BIN/pixmesh-loadgen" flood "$GW_ADDR" --clients 0 --seconds "$DUR" --legit-rps 50 --api-key "$KEY")
wait "$ATTACK"
fl=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); l=json.loads(sys.argv[2]); a["legit"]=l["legit"]; print(json.dumps(a))' "$WORK/attack.json" "$fl")
stats=$(curl -s "http://$SINK/__stats")
hwm=$(awk '/VmHWM/{print $2}' "/proc/$FLOOD_PID/status")
curl -s "http://$GW_ADMIN/metrics" | grep '^pixmesh_gateway_upload_refusal_seconds{' >"$WORK/refusal.txt" || true
python3 - "$base" "$fl" "$stats" "$hwm" "$WORK/refusal.txt" <<'PY'
import json, re, sys
base, fl, stats, hwm = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
inside = {m.group(1): float(m.group(2)) * 1e3 for m in re.finditer(r'quantile="([0-9.]+)"\} ([0-9.e+-]+)', open(sys.argv[5]).read())}
f = fl["flood"]
print(f"\nflood: {f['requests']} refused uploads, statuses {f['statuses']}, client errors {f['errors']}")
r = f["reject_latency"]
print(f"  refusal seen by the clients, from their header bytes: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms")
if inside:
    print(f"  refusal inside the gateway, from the request head: p50 {inside.get('0.5', 0):.3f} ms, p99 {inside.get('0.99', 0):.3f} ms, max {inside.get('1', 0):.3f} ms")
print(f"  bytes of flood uploads that reached the upload service: {stats['flood_bytes']} ({stats['flood_requests']} requests)")
print(f"  gateway peak RSS: {hwm/1024:.1f} MB")
b, l = base["legit"], fl["legit"]
print(f"  legitimate uploads p99: {l['latency']['p99_ms']:.2f} ms with the flood, {b['latency']['p99_ms']:.2f} ms without "
      f"(ratio {l['latency']['p99_ms']/max(b['latency']['p99_ms'],1e-9):.2f}); statuses {l['statuses']} errors {l['errors']}")
PY
