-- `dependents_waiting` (0009) is set by a trigger on the insert of a BLOCKED standalone task
-- rather than by the service's CreateTask: every writer then keeps it, including servers of the
-- previous release during a rolling upgrade, whose CreateTask does not know the column (without
-- the trigger, such a server could create a task waiting on one that a new server then
-- completes through the one-statement path, leaving the new task BLOCKED). The dependency rows
-- are already locked by the inserting transaction (FOR NO KEY UPDATE by this release; FOR SHARE
-- by the previous one, where two creations sharing a dependency can then deadlock and one is
-- retried by its client). Finished dependencies need no mark.
CREATE FUNCTION tasks_mark_dependencies() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET dependents_waiting = true
    WHERE id = ANY (NEW.depends_on) AND NOT dependents_waiting AND status NOT IN (4, 5, 6, 7);
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_mark_dependencies AFTER INSERT ON tasks FOR EACH ROW
    WHEN (NEW.run_id IS NULL AND NEW.status = 1)
    EXECUTE FUNCTION tasks_mark_dependencies();
