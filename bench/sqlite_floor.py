#!/usr/bin/env python3
"""The SQLite floor for bench/dispatch.sh: the plain claim + complete loop, with none of
pixmesh's code, on the same disk and the same durability as pixmesh's embedded store (WAL,
synchronous=FULL, one writer at a time, BEGIN IMMEDIATE).

Prints one JSON object:
  commits_per_second    one-row write transactions in a row: what this disk's fsync allows
  one_per_commit        jobs/s claiming one job per transaction and completing it in another
                        (two commits per job, as the pgbench floor does on PostgreSQL)
  batched_per_commit    jobs/s claiming BATCH jobs in one transaction and completing them in
                        another (what a dispatcher that batches could reach at most), with an
                        event row written for each change as pixmesh does

Usage: sqlite_floor.py DIR JOBS [BATCH]
"""
import json
import os
import sqlite3
import sys
import time


def open_db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=30000")
    return db


def fill(db, jobs):
    db.executescript(
        """
        CREATE TABLE q (id TEXT PRIMARY KEY, state TEXT NOT NULL, attempt INTEGER NOT NULL,
                        lease_owner TEXT, lease_expires_at INTEGER, created_at INTEGER NOT NULL,
                        payload TEXT NOT NULL, result TEXT) STRICT;
        CREATE INDEX q_queued ON q (created_at, id) WHERE state = 'queued';
        CREATE TABLE ev (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, kind TEXT NOT NULL,
                         at INTEGER NOT NULL, data TEXT NOT NULL) STRICT;
        CREATE INDEX ev_job ON ev (job_id, id);
        """
    )
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT INTO q (id, state, attempt, created_at, payload) VALUES (?, 'queued', 0, ?, '{\"width\":8}')",
        ((f"j{n:08}", n) for n in range(jobs)),
    )
    db.execute("COMMIT")


CLAIM = """UPDATE q SET state = 'processing', attempt = attempt + 1, lease_owner = 'bench', lease_expires_at = ?
           WHERE id IN (SELECT id FROM q WHERE state = 'queued' ORDER BY created_at, id LIMIT ?) RETURNING id, attempt"""
DONE = "UPDATE q SET state = 'done', result = '{}', lease_owner = NULL, lease_expires_at = NULL WHERE id = ? AND attempt = ?"
EVENT = "INSERT INTO ev (job_id, kind, at, data) VALUES (?, ?, ?, '{}')"


def loop(db, jobs, batch, events):
    now = int(time.time() * 1000)
    done = 0
    started = time.perf_counter()
    while done < jobs:
        db.execute("BEGIN IMMEDIATE")
        claimed = db.execute(CLAIM, (now + 30000, batch)).fetchall()
        if events:
            db.executemany(EVENT, ((i, "claimed", now) for i, _ in claimed))
        db.execute("COMMIT")
        if not claimed:
            break
        db.execute("BEGIN IMMEDIATE")
        db.executemany(DONE, claimed)
        if events:
            db.executemany(EVENT, ((i, "succeeded", now) for i, _ in claimed))
        db.execute("COMMIT")
        done += len(claimed)
    return done / (time.perf_counter() - started)


def commits(db, n):
    db.execute("CREATE TABLE c (k INTEGER PRIMARY KEY, v INTEGER NOT NULL) STRICT")
    db.execute("INSERT INTO c VALUES (1, 0)")
    started = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE c SET v = ? WHERE k = 1", (i,))
        db.execute("COMMIT")
    return n / (time.perf_counter() - started)


def main():
    directory, jobs = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    out = {"jobs": jobs, "batch": batch}
    db = open_db(os.path.join(directory, "floor-commits.db"))
    out["commits_per_second"] = commits(db, min(jobs, 3000))
    db.close()
    for name, size, events in (("one_per_commit", 1, False), ("batched_per_commit", batch, True)):
        db = open_db(os.path.join(directory, f"floor-{name}.db"))
        fill(db, jobs)
        out[name] = loop(db, jobs, size, events)
        db.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
