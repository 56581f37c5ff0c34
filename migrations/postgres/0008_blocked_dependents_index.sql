-- `depends_on` is searched for one thing only: when a task ends, the BLOCKED standalone tasks
-- that depend on it (src/store/workflow.rs, `advance_dependents` and the `has_dependents` read
-- of `finish_attempt`). Index just those rows. The GIN index over every task took an entry for
-- every insert and every update of a task (updates change `status`, so they are not HOT), into
-- its pending list (GIN fastupdate), which grows to gin_pending_list_limit (4 MB by default)
-- between vacuums and which every search scans: each completion paid for it. The partial index
-- holds only the dependents still waiting, so both stay small. Query results do not change.
CREATE INDEX tasks_blocked_depends_on ON tasks USING gin (depends_on) WHERE run_id IS NULL AND status = 1;
DROP INDEX tasks_depends_on;
