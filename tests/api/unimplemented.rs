//! Methods whose implementation has not landed answer UNIMPLEMENTED, never a fake success.

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::spawn_app;
use tmws::pb;

fn assert_unimplemented(method: &str, status: tonic::Status) {
    assert_eq!(status.code(), Code::Unimplemented, "{method}: {status:?}");
    assert!(status.message().contains(method), "{method}: message {:?}", status.message());
    let details = status.get_error_details();
    let info = details.error_info().unwrap_or_else(|| panic!("{method}: no ErrorInfo"));
    assert_eq!(info.reason, "NOT_IMPLEMENTED");
    assert_eq!(info.domain, "tmws");
    assert_eq!(info.metadata.get("method").map(String::as_str), Some(method));
}

macro_rules! check {
    ($client:expr, $svc:literal, $( $method:ident($req:ident) => $name:literal ),* $(,)?) => {
        $(
            let status = $client.$method(pb::$req::default()).await.expect_err(concat!($name, " must not succeed"));
            assert_unimplemented(concat!("tmws.v1.", $svc, "/", $name), status);
        )*
    };
}

#[tokio::test]
async fn pending_methods_answer_unimplemented() {
    let app = spawn_app().await;
    let mut workflow = app.workflow();
    check!(workflow, "WorkflowService",
        create_workflow(CreateWorkflowRequest) => "CreateWorkflow",
        get_workflow(GetWorkflowRequest) => "GetWorkflow",
        list_workflows(ListWorkflowsRequest) => "ListWorkflows",
        delete_workflow(DeleteWorkflowRequest) => "DeleteWorkflow",
        start_run(StartRunRequest) => "StartRun",
        get_run(GetRunRequest) => "GetRun",
        list_runs(ListRunsRequest) => "ListRuns",
        cancel_run(CancelRunRequest) => "CancelRun",
        create_task(CreateTaskRequest) => "CreateTask",
        get_task(GetTaskRequest) => "GetTask",
        list_tasks(ListTasksRequest) => "ListTasks",
        claim_tasks(ClaimTasksRequest) => "ClaimTasks",
        heartbeat_task(HeartbeatTaskRequest) => "HeartbeatTask",
        complete_task(CompleteTaskRequest) => "CompleteTask",
        fail_task(FailTaskRequest) => "FailTask",
    );
    // The streaming method too: the error arrives either as the call's status or as the
    // stream's first item.
    let status = match workflow.watch_run(pb::WatchRunRequest::default()).await {
        Err(status) => status,
        Ok(resp) => resp.into_inner().next().await.expect("an item").expect_err("WatchRun must not succeed"),
    };
    assert_unimplemented("tmws.v1.WorkflowService/WatchRun", status);
    app.stop().await.expect("clean stop");
}
