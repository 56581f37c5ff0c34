//! gRPC adapter for `tmws.v1.WorkflowService`.
//!
//! Each method validates its request, takes the caller's principal and calls the workflow engine.
//! Methods whose implementation has not landed answer UNIMPLEMENTED (never a fake success).

use tonic::{Request, Response, Status};

use super::{EventStream, not_yet};
use crate::pb::{self, workflow_service_server::WorkflowService};

#[derive(Debug, Clone, Default)]
pub struct WorkflowApi {}

#[tonic::async_trait]
impl WorkflowService for WorkflowApi {
    async fn create_workflow(
        &self,
        _request: Request<pb::CreateWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        not_yet("tmws.v1.WorkflowService/CreateWorkflow")
    }

    async fn get_workflow(&self, _request: Request<pb::GetWorkflowRequest>) -> Result<Response<pb::Workflow>, Status> {
        not_yet("tmws.v1.WorkflowService/GetWorkflow")
    }

    async fn list_workflows(
        &self,
        _request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        not_yet("tmws.v1.WorkflowService/ListWorkflows")
    }

    async fn delete_workflow(
        &self,
        _request: Request<pb::DeleteWorkflowRequest>,
    ) -> Result<Response<pb::DeleteWorkflowResponse>, Status> {
        not_yet("tmws.v1.WorkflowService/DeleteWorkflow")
    }

    async fn start_run(&self, _request: Request<pb::StartRunRequest>) -> Result<Response<pb::Run>, Status> {
        not_yet("tmws.v1.WorkflowService/StartRun")
    }

    async fn get_run(&self, _request: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        not_yet("tmws.v1.WorkflowService/GetRun")
    }

    async fn list_runs(
        &self,
        _request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        not_yet("tmws.v1.WorkflowService/ListRuns")
    }

    async fn cancel_run(&self, _request: Request<pb::CancelRunRequest>) -> Result<Response<pb::Run>, Status> {
        not_yet("tmws.v1.WorkflowService/CancelRun")
    }

    type WatchRunStream = EventStream<pb::RunEvent>;

    async fn watch_run(
        &self,
        _request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        not_yet("tmws.v1.WorkflowService/WatchRun")
    }

    async fn create_task(&self, _request: Request<pb::CreateTaskRequest>) -> Result<Response<pb::Task>, Status> {
        not_yet("tmws.v1.WorkflowService/CreateTask")
    }

    async fn get_task(&self, _request: Request<pb::GetTaskRequest>) -> Result<Response<pb::Task>, Status> {
        not_yet("tmws.v1.WorkflowService/GetTask")
    }

    async fn list_tasks(
        &self,
        _request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        not_yet("tmws.v1.WorkflowService/ListTasks")
    }

    async fn claim_tasks(
        &self,
        _request: Request<pb::ClaimTasksRequest>,
    ) -> Result<Response<pb::ClaimTasksResponse>, Status> {
        not_yet("tmws.v1.WorkflowService/ClaimTasks")
    }

    async fn heartbeat_task(&self, _request: Request<pb::HeartbeatTaskRequest>) -> Result<Response<pb::Task>, Status> {
        not_yet("tmws.v1.WorkflowService/HeartbeatTask")
    }

    async fn complete_task(&self, _request: Request<pb::CompleteTaskRequest>) -> Result<Response<pb::Task>, Status> {
        not_yet("tmws.v1.WorkflowService/CompleteTask")
    }

    async fn fail_task(&self, _request: Request<pb::FailTaskRequest>) -> Result<Response<pb::Task>, Status> {
        not_yet("tmws.v1.WorkflowService/FailTask")
    }
}
