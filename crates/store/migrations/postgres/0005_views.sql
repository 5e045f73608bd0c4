-- The status read model: each job's view (the JSON of `JobView`), folded from its events by the
-- status service's projector, which saves its place in the outbox in `projections`. Rebuildable
-- from the events (`pixmesh admin rebuild-views`).
CREATE TABLE job_views (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    view TEXT NOT NULL
);
-- A key's jobs newest first, all of them or in one state.
CREATE INDEX job_views_owner ON job_views (owner, created_at DESC, id DESC);
CREATE INDEX job_views_owner_state ON job_views (owner, state, created_at DESC, id DESC);
CREATE TABLE projections (
    name TEXT PRIMARY KEY,
    cursor BIGINT NOT NULL
);
