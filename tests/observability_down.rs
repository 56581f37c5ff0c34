//! An unreachable collector never fails calls: spans and metrics are exported in the background
//! and dropped when the collector is away. Its own test binary: telemetry is process-global.

#[path = "common/mod.rs"]
mod common;

use tmws::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_while_the_collector_is_down() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    // SAFETY: set before any thread reads these variables (telemetry is initialised just below).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{closed}"));
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "200");
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "50");
    }
    let _telemetry = tmws::telemetry::init(tmws::config::LogFormat::Json).expect("telemetry");
    let app = common::spawn_app().await;
    let mut client = app.memory();
    for i in 0..50 {
        let m = client
            .create_memory(pb::CreateMemoryRequest {
                memory: Some(pb::Memory { content: format!("note {i}"), ..Default::default() }),
                ..Default::default()
            })
            .await
            .expect("calls succeed without a collector");
        client.get_memory(pb::GetMemoryRequest { id: m.into_inner().id, ..Default::default() }).await.expect("get");
    }
    app.stop().await.expect("stop");
}
