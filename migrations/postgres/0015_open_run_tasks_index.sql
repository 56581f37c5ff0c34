-- When a task of a run ends, the run advances by reading the BLOCKED children of that task and
-- whether any other task of the run is still open (src/store/workflow.rs, `advance_run`); it
-- used to read every task of the run, inputs and outputs included, at each completion, which
-- made a run of n steps cost O(n^2). This index holds the open tasks of runs (BLOCKED, QUEUED,
-- LEASED) only, so "is another task open" stops at the first entry and the children are looked
-- for among the open tasks alone. Standalone tasks (run_id NULL) take no entry.
CREATE INDEX tasks_run_open ON tasks (run_id) WHERE run_id IS NOT NULL AND status IN (1, 2, 3);
