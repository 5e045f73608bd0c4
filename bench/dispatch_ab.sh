#!/usr/bin/env bash
# A/B of dispatch between two builds, run alternately in one session so that both see the same
# machine: for each round, build A then build B, each on SQLite (a temp file) and on PostgreSQL
# polling (a fresh database on the test server, dropped after), with simulated instant workers
# (crates/loadgen/src/dispatch.rs). Prints jobs/s and the accepted→claimed p99 per run.
#
# Usage: bench/dispatch_ab.sh DIR_A DIR_B   (each holds release `pixmesh` and `pixmesh-loadgen`,
#        e.g. copied out of target/release after `cargo build --release -p pixmesh -p pixmesh-loadgen`
#        at each revision; copy them out, since both revisions build into the same target dir)
# Env: JOBS (default 5000), ROUNDS (default 3), DBS (default "sqlite pg")
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DIR_A DIR_B" >&2; exit 64; }
JOBS="${JOBS:-5000}"
SERVER="${PIXMESH_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for side in A B; do
    bin=$([ "$side" = A ] && echo "$1" || echo "$2")
    for db in ${DBS:-sqlite pg}; do
      dir="$(mktemp -d)"
      if [ "$db" = pg ]; then
        name="pixmesh_ab_${side,,}_${round}_$$"
        psql "$SERVER" -qc "CREATE DATABASE $name" >/dev/null
        url="${SERVER%/*}/$name"
      else
        url="sqlite:$dir/jobs.db"
      fi
      out="$("$bin/pixmesh-loadgen" dispatch --pixmesh "$bin/pixmesh" --database "$url" --data-dir "$dir" --jobs "$JOBS" \
        --distributors 1 --concurrency 32 --latency-jobs 500 --latency-rate 100 2>/dev/null | tail -1)"
      jobs="$(echo "$out" | sed -n 's/.*"jobs_per_second":\([0-9.]*\).*/\1/p')"
      p99="$(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p')"
      printf 'round %s  %s  %-6s  %8.0f jobs/s  p99 %s ms\n' "$round" "$side" "$db" "${jobs:-0}" "${p99:-?}"
      if [ "$db" = pg ]; then psql "$SERVER" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null; fi
      rm -rf "$dir"
    done
  done
done
