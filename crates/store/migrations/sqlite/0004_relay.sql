-- The outbox relay's lease and cursor: the relay that holds the lease publishes the event rows
-- (the outbox) to the broker in id order, and saves here how far it got. Any number of relays
-- may run; one publishes at a time, and another takes over when its lease runs out.
CREATE TABLE relays (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    cursor INTEGER NOT NULL
);
