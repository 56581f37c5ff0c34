-- When a task of a run ends, the run advances from that task's children (found through
-- `task_dependencies`, which until now held the edges of standalone tasks only) and checks
-- whether any task of the run is still open (`tasks_run_open`); it used to read every task of
-- the run at each completion, which made a run of n steps cost O(n^2) (src/store/sqlite/workflow.rs,
-- `advance_run`). StartRun now writes the edges of a run's tasks; the runs already stored get
-- theirs here.
INSERT OR IGNORE INTO task_dependencies (parent_id, child_id)
SELECT p.id, t.id FROM tasks t, json_each(t.depends_on) j
JOIN tasks p ON p.id = unhex(replace(j.value, '-', ''))
WHERE t.run_id IS NOT NULL;
CREATE INDEX tasks_run_open ON tasks (run_id) WHERE run_id IS NOT NULL AND status IN (1, 2, 3);
