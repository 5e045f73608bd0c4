#!/usr/bin/env bash
# Dispatch benchmark: how fast distributors move jobs that were already accepted through the job
# store, with simulated gRPC workers that answer at once (no pixels), and how long a new job
# waits from `accepted` to `claimed` (p50/p99) — on (a) SQLite and (b) PostgreSQL (distributors
# woken by polling the database) and (c) PostgreSQL + NATS JetStream (distributors woken by the
# wake-up stream; each latency-phase job also gets the upload service's early wake-up), beside
# the floors measured in the same run on the same servers: a pgbench script of the plain SKIP
# LOCKED lease + complete loop (claim the oldest queued row with FOR UPDATE SKIP LOCKED, then
# mark it done; two commits per job, as pixmesh's claim and commit), with 4 clients; and a
# JetStream publish + consume/ack loop on a work-queue stream with the durability pixmesh uses
# (file storage, the server's own sync interval); and for SQLite, bench/sqlite_floor.py: the same
# claim + complete loop in Python's sqlite3 on the same disk with pixmesh's durability (WAL,
# synchronous=FULL), one job per commit (two commits per job, as the pgbench floor) and batched
# (the ceiling for a dispatcher that claims and commits many jobs per transaction).
#
# Jobs/s is read off the job log (first `claimed` to last `succeeded`); see
# crates/loadgen/src/dispatch.rs. PostgreSQL is the machine's (PIXMESH_TEST_POSTGRES, default
# postgres://postgres@127.0.0.1:5432/postgres), with its own settings for both sides; each run
# uses a fresh database, dropped at the end. NATS is the machine's (PIXMESH_TEST_NATS, default
# nats://127.0.0.1:4222), each run in a namespace of its own.
#
# Usage: bench/dispatch.sh     Env: JOBS (default 5000), DISTRIBUTORS (default 1 2),
#                                   CONCURRENCY (default 32), LATENCY_RATE (default 100/s)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-5000}"
DISTRIBUTORS="${DISTRIBUTORS:-1 2}"
CONCURRENCY="${CONCURRENCY:-32}"
RATE="${LATENCY_RATE:-100}"
SERVER="${PIXMESH_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
NATS="${PIXMESH_TEST_NATS:-nats://127.0.0.1:4222}"
cargo build --release -q -p pixmesh -p pixmesh-loadgen
T="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
dbs=()
cleanup() {
  for db in "${dbs[@]}"; do psql "$SERVER" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fresh_db() { # name; sets $url
  psql "$SERVER" -qc "CREATE DATABASE $1" >/dev/null
  dbs+=("$1")
  url="${SERVER%/*}/$1"
}

run() { # label database-url distributors [extra loadgen args]
  local dir="$work/$1-$3"
  mkdir -p "$dir"
  "$T/pixmesh-loadgen" dispatch --pixmesh "$T/pixmesh" --database "$2" --data-dir "$dir" --jobs "$JOBS" \
    --distributors "$3" --concurrency "$CONCURRENCY" --latency-jobs $((RATE * 5)) --latency-rate "$RATE" "${@:4}"
}

echo "== floor: pgbench, SKIP LOCKED lease + complete, 4 clients"
fresh_db "pixmesh_bench_floor_$$"
floor_url="$url"
per_client=$((JOBS / 4 > 500 ? JOBS / 4 : 500))
psql "$floor_url" -q <<SQL
CREATE TABLE q (id bigserial PRIMARY KEY, state text NOT NULL, lease_owner text, lease_expires_at bigint,
                created_at bigint NOT NULL, payload text NOT NULL) WITH (fillfactor = 80);
CREATE INDEX q_queued ON q (created_at, id) WHERE state = 'queued';
INSERT INTO q (state, created_at, payload) SELECT 'queued', n, '{}' FROM generate_series(1, $((per_client * 4 + 100))) AS n;
VACUUM ANALYZE q;
SQL
cat > "$work/loop.sql" <<'SQL'
WITH next AS (SELECT id FROM q WHERE state = 'queued' ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE q SET state = 'processing', lease_owner = 'bench', lease_expires_at = 0 FROM next WHERE q.id = next.id RETURNING q.id AS claimed \gset
UPDATE q SET state = 'done', lease_owner = NULL, lease_expires_at = NULL WHERE id = :claimed;
SQL
floor=$(pgbench -n -c 4 -j 2 -t "$per_client" -f "$work/loop.sql" "$floor_url" 2>/dev/null | awk '/^tps/ && !seen { print $3; seen = 1 }')
echo "  $floor jobs/s"

echo "== floor: JetStream publish + consume/ack, work-queue stream, file storage"
jsfloor="$("$T/pixmesh-loadgen" jetstream-floor --url "$NATS" --messages $((JOBS * 4)))"
echo "  $jsfloor"

echo "== floor: SQLite claim + complete loop (WAL, synchronous=FULL)"
mkdir -p "$work/sqlite-floor"
sqfloor="$(python3 bench/sqlite_floor.py "$work/sqlite-floor" "$JOBS" 32)"
echo "  $sqfloor"

results=()
for d in $DISTRIBUTORS; do
  echo "== SQLite, $d distributor(s)"
  results+=("$(run sqlite "sqlite:$work/sqlite-$d.db" "$d")")
  echo "  ${results[-1]}"
  echo "== PostgreSQL (polling), $d distributor(s)"
  fresh_db "pixmesh_bench_${d}_$$"
  results+=("$(run postgres "$url" "$d")")
  echo "  ${results[-1]}"
  echo "== PostgreSQL + NATS, $d distributor(s)"
  fresh_db "pixmesh_bench_nats_${d}_$$"
  results+=("$(run nats "$url" "$d" --queue "$NATS/bench$$x$d")")
  echo "  ${results[-1]}"
done

python3 - "$floor" "$jsfloor" "$sqfloor" "${results[@]}" <<'PY'
import json, sys
floor = float(sys.argv[1])
js = json.loads(sys.argv[2])
sq = json.loads(sys.argv[3])
print("\nsummary (same run, same machine):")
print(f"  floor: pgbench SKIP LOCKED lease + complete loop, 4 clients: {floor:.0f} jobs/s")
print(f"  floor: JetStream publish {js['publish_per_second']:.0f}/s, consume+ack {js['consume_ack_per_second']:.0f}/s,"
      f" whole loop {js['loop_per_second']:.0f} messages/s")
print(f"  floor: SQLite {sq['commits_per_second']:.0f} commits/s; claim + complete one job per commit"
      f" {sq['one_per_commit']:.0f} jobs/s, {sq['batch']} per commit {sq['batched_per_commit']:.0f} jobs/s")
for r in map(json.loads, sys.argv[4:]):
    kind = "SQLite" if r["database"].startswith("sqlite") else ("PG + NATS" if r.get("queue") else "PostgreSQL")
    lat = r["accepted_to_claimed"]
    line = (f"  {kind:10} {r['distributors']} distributor(s) x {r['concurrency']} in flight: {r['jobs_per_second']:7.0f} jobs/s"
            f" (claims per distributor {r['claims_per_distributor']})")
    if kind == "SQLite":
        line += (f" = {r['jobs_per_second'] / sq['one_per_commit']:.2f}x the one-per-commit floor,"
                 f" {r['jobs_per_second'] / sq['batched_per_commit']:.2f}x the batched one")
    else:
        line += f" = {r['jobs_per_second'] / floor:.2f}x the floor"
    line += f"; accepted->claimed at {r['latency_rate']}/s: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
    print(line)
PY
