//! Workflows in the embedded store. (Placeholder: every call answers UNIMPLEMENTED.)
#![allow(unused_variables)]

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use super::SqliteStore;
use crate::{
    error::{Error, Result},
    store::{identity::AuditEvent, workflow::*},
    workflow::*,
};

#[async_trait]
impl WorkflowStore for SqliteStore {
    /// Stores a new version of `name` (version = latest + 1, serialised per name).
    #[allow(clippy::too_many_arguments)]
    async fn create_workflow(
        &self,
        ns: &str,
        name: &str,
        description: &str,
        definition: &Definition,
        labels: &HashMap<String, String>,
        created_by: &str,
        request_id: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Workflow> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn get_workflow(&self, ns: &str, id: Uuid) -> Result<Option<Workflow>> {
        Err(Error::Unimplemented("embedded store"))
    }
    /// `version` None = latest.
    async fn get_workflow_by_name(&self, ns: &str, name: &str, version: Option<i32>) -> Result<Option<Workflow>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn list_workflows(
        &self,
        ns: &str,
        name: Option<&str>,
        latest_only: bool,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Workflow>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn delete_workflow(&self, ns: &str, id: Uuid, audit: Option<&AuditEvent>) -> Result<bool> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Creates the run and one task per step; roots are queued. Same request id, same run.
    #[allow(clippy::too_many_arguments)]
    async fn start_run(
        &self,
        workflow: &Workflow,
        input: &Value,
        default_retry: RetryPolicy,
        timeout_ms: Option<i64>,
        created_by: &str,
        request_id: Option<&str>,
        trace_parent: Option<&str>,
        audit: Option<&AuditEvent>,
    ) -> Result<Run> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn get_run(&self, ns: &str, id: Uuid) -> Result<Option<Run>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn list_runs(&self, ns: &str, filter: &RunFilter, after: Option<PageKey>, limit: usize) -> Result<Vec<Run>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn cancel_run(&self, ns: &str, id: Uuid, reason: &str, audit: Option<&AuditEvent>) -> Result<Run> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn run_events(&self, run_id: Uuid, after_sequence: i64, limit: usize) -> Result<Vec<RunEvent>> {
        Err(Error::Unimplemented("embedded store"))
    }

    async fn create_task(&self, task: &NewTask, audit: Option<&AuditEvent>) -> Result<Task> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn get_task(&self, ns: &str, id: Uuid) -> Result<Option<Task>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn list_tasks(
        &self,
        ns: &str,
        filter: &TaskFilter,
        after: Option<PageKey>,
        limit: usize,
    ) -> Result<Vec<Task>> {
        Err(Error::Unimplemented("embedded store"))
    }

    async fn claim_tasks(
        &self,
        ns: &str,
        queue: &str,
        worker: &str,
        max: usize,
        lease_ms: i64,
        audit: Option<&AuditEvent>,
    ) -> Result<Vec<LeasedTask>> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn heartbeat(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        lease_ms: Option<i64>,
        progress: Option<&Value>,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn complete_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        output: &Value,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        Err(Error::Unimplemented("embedded store"))
    }
    async fn fail_task(
        &self,
        ns: &str,
        id: Uuid,
        token: Uuid,
        error: &str,
        retryable: bool,
        audit: Option<&AuditEvent>,
    ) -> Result<Task> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Engine: fails attempts whose lease (or attempt timeout) expired; returns how many.
    async fn expire_leases(&self, limit: usize) -> Result<usize> {
        Err(Error::Unimplemented("embedded store"))
    }
    /// Engine: ends runs past their deadline as TIMED_OUT; returns how many.
    async fn time_out_runs(&self, limit: usize) -> Result<usize> {
        Err(Error::Unimplemented("embedded store"))
    }
    /// Engine: leases due server-side steps (DELAY, NOOP, MEMORY_WRITE) to the engine.
    /// Returns each leased step with its config, the agent that started its run (or created
    /// it), and the run's traceparent.
    async fn lease_server_steps(&self, limit: usize, lease_ms: i64) -> Result<Vec<ServerStep>> {
        Err(Error::Unimplemented("embedded store"))
    }
}
