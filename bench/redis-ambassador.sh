#!/usr/bin/env bash
# The Redis ambassador against twemproxy (Debian's `nutcracker`), same machine, same run:
# three redis-server shards, the same ketama pool in both (hash HASH, hash tag {}), and
# `redis-benchmark` with a pipeline of DEPTH from CLIENTS clients over a keyspace of KEYS random
# keys. The two alternate for ROUNDS rounds; prints each round's ops/s and p99 per test, the
# medians, and ambassador/twemproxy. Then how keys spread over the shards: random keys, and
# neighbouring keys (`user:1` … `user:N`), per hash.
#
# Usage: bench/redis-ambassador.sh
# Env: ROUNDS (5), REQUESTS (300000), DEPTH (16), CLIENTS (50), KEYS (1000000),
#      TESTS (set,get,mset), HASH (fnv1a_64: twemproxy's default),
#      AMB_THREADS (the ambassador's runtime threads; default one per core. twemproxy has one:
#      AMB_THREADS=1 compares them thread for thread)
ROUNDS="${ROUNDS:-5}"
REQUESTS="${REQUESTS:-300000}"
DEPTH="${DEPTH:-16}"
CLIENTS="${CLIENTS:-50}"
KEYS="${KEYS:-1000000}"
TESTS="${TESTS:-set,get,mset}"
HASH="${HASH:-fnv1a_64}"
command -v nutcracker >/dev/null || { echo "needs twemproxy: apt-get install nutcracker" >&2; exit 1; }
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh" pixmesh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }

shards=()
for i in 1 2 3; do
  port="$(free_port)"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --logfile "$work/redis-$i.log" &
  track $!
  wait_port "$port"
  shards+=("127.0.0.1:$port")
done

amb_port="$(free_port)"
threads=()
[ -n "${AMB_THREADS:-}" ] && threads=(TOKIO_WORKER_THREADS="$AMB_THREADS")
env "${threads[@]}" RUST_LOG=warn "$T/pixmesh" --set "ambassador.redis.hash=\"$HASH\"" ambassador redis --listen "127.0.0.1:$amb_port" \
  --shards "$(IFS=,; echo "${shards[*]}")" >"$work/amb.out" 2>"$work/amb.err" &
ambassador=$!
track "$ambassador"
nut_port="$(free_port)"
{
  echo "pool:"
  echo "  listen: 127.0.0.1:$nut_port"
  echo "  hash: $HASH"
  echo "  hash_tag: \"{}\""
  echo "  distribution: ketama"
  echo "  redis: true"
  echo "  servers:"
  for s in "${shards[@]}"; do echo "    - $s:1"; done
} >"$work/nutcracker.yml"
nutcracker -c "$work/nutcracker.yml" -s "$(free_port)" -o "$work/nutcracker.log" &
track $!
wait_port "$amb_port"
wait_port "$nut_port"

bench() { # port round label ; appends "label,round,test,rps,p99" lines
  redis-benchmark -h 127.0.0.1 -p "$1" -t "$TESTS" -n "$REQUESTS" -r "$KEYS" -P "$DEPTH" -c "$CLIENTS" --csv 2>/dev/null |
    python3 -c 'import csv,sys
for row in csv.reader(sys.stdin):
    if row and row[0] != "test": print(f"{sys.argv[1]},{sys.argv[2]},{row[0]},{row[1]},{row[6]}")' "$3" "$2" >>"$work/results.csv"
}

echo "redis-benchmark -t $TESTS -n $REQUESTS -r $KEYS -P $DEPTH -c $CLIENTS; 3 shards; hash $HASH; $ROUNDS rounds; ambassador threads: ${AMB_THREADS:-one per core}"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then bench "$amb_port" "$r" ambassador; bench "$nut_port" "$r" twemproxy
  else bench "$nut_port" "$r" twemproxy; bench "$amb_port" "$r" ambassador; fi
done

python3 - "$work/results.csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
tests = list(dict.fromkeys(r[2] for r in rows))
for t in tests:
    print(f"\n{t}")
    med = {}
    for who in ("ambassador", "twemproxy"):
        mine = [r for r in rows if r[0] == who and r[2] == t]
        rps = [float(r[3]) for r in mine]
        p99 = [float(r[4]) for r in mine]
        med[who] = (statistics.median(rps), statistics.median(p99))
        print(f"  {who:10}  ops/s " + " ".join(f"{x:>9.0f}" for x in rps) + f"   median {med[who][0]:>9.0f}"
              f"   p99 ms " + " ".join(f"{x:.3f}" for x in p99) + f"   median {med[who][1]:.3f}")
    print(f"  ambassador/twemproxy: ops/s {med['ambassador'][0] / med['twemproxy'][0]:.2f}x, "
          f"p99 {med['ambassador'][1] / med['twemproxy'][1]:.2f}x")
EOF

echo
echo "keys per shard (the same placement in both: the e2e suite checks it)"
for s in "${shards[@]}"; do redis-cli -h "${s%:*}" -p "${s#*:}" FLUSHALL >/dev/null; done
spread() { # label ; DBSIZE of each shard, and the largest over the mean
  local sizes=()
  for s in "${shards[@]}"; do sizes+=("$(redis-cli -h "${s%:*}" -p "${s#*:}" DBSIZE)"); done
  python3 -c 'import sys; n=[int(x) for x in sys.argv[2:]]; print(f"  {sys.argv[1]:44} {n}  max/mean {max(n)/(sum(n)/len(n)):.2f}")' "$1" "${sizes[@]}"
  for s in "${shards[@]}"; do redis-cli -h "${s%:*}" -p "${s#*:}" FLUSHALL >/dev/null; done
}
redis-benchmark -h 127.0.0.1 -p "$amb_port" -t set -n 100000 -r 100000 -P 16 -q >/dev/null 2>&1
spread "$HASH, 100,000 random keys (redis-benchmark -r)"
python3 -c 'import sys
for i in range(30000): sys.stdout.write(f"SET user:{i} x\r\n")' | redis-cli -h 127.0.0.1 -p "$amb_port" --pipe >/dev/null
spread "$HASH, user:0 … user:29999"
# The ambassador's default hash, on its own (twemproxy runs the pool above).
kill "$ambassador"; wait "$ambassador" 2>/dev/null || true
RUST_LOG=warn "$T/pixmesh" ambassador redis --listen "127.0.0.1:$amb_port" --shards "$(IFS=,; echo "${shards[*]}")" \
  >"$work/amb2.out" 2>"$work/amb2.err" &
track $!
wait_port "$amb_port"
python3 -c 'import sys
for i in range(30000): sys.stdout.write(f"SET user:{i} x\r\n")' | redis-cli -h 127.0.0.1 -p "$amb_port" --pipe >/dev/null
spread "fnv1a_32 (the default), user:0 … user:29999"
