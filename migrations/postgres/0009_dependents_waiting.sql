-- A standalone task created BLOCKED marks each of its dependencies: `dependents_waiting` says
-- "a task may be waiting for this one to end". CompleteTask of a standalone task whose flag is
-- clear needs no dependents search, so it runs as one autocommitted statement (lease check,
-- outcome, attempt, audit row); a set flag sends it down the locking path, which searches
-- (src/store/workflow.rs, `complete_fast`). The flag is set by CreateTask under the row lock it
-- takes on the dependency (FOR NO KEY UPDATE), so a completion racing with it either ends
-- first (the new task then sees the dependency finished) or re-reads the row after the lock and
-- sees the flag. It is never cleared: a set flag only costs the slower path.
ALTER TABLE tasks ADD COLUMN dependents_waiting boolean NOT NULL DEFAULT false;
UPDATE tasks SET dependents_waiting = true
WHERE id IN (SELECT unnest(depends_on) FROM tasks WHERE run_id IS NULL AND status = 1);
