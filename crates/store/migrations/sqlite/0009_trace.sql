-- The W3C traceparent of the upload that made the job: its claims, worker calls and commits
-- are spans of that trace.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
