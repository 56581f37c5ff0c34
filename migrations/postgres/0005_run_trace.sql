-- The W3C traceparent of the call that started a run, so the engine's background work on the
-- run (timers, server-side steps) can link its spans to that trace.
ALTER TABLE runs ADD COLUMN trace_parent text;
