//! The credential cache (PostgreSQL): found API keys and JWT agents are remembered, and a
//! revocation, a suspension or any other change to agents and keys — on another replica, on this
//! one, in plain SQL — still takes effect at once, also after the listening connection was lost.
//!
//! The cached servers here remember credentials for an hour (TMWS_AUTH_CACHE_TTL=1h), so only
//! the change announcements and the replica's own bookkeeping can make a change visible within
//! these tests' deadlines.

use std::time::Duration;

use sqlx::Executor;
use tonic::Code;

use crate::common::{
    TestApp, as_agent, disable_triggers, execute_unannounced, fresh_database, pg_connect, postgres_env, spawn_secure,
    terminate_listeners, with_key,
};
use tmws::pb;

const CACHED: &[(&str, &str)] = &[("TMWS_AUTH_CACHE_TTL", "1h")];
const UNCACHED: &[(&str, &str)] = &[("TMWS_AUTH_CACHE_TTL", "0")];

fn list() -> pb::ListMemoriesRequest {
    pb::ListMemoriesRequest { page_size: 1, ..Default::default() }
}

/// ListMemories with `key`: Ok, or the status code.
async fn call_with_key(app: &TestApp, key: &str) -> Result<(), Code> {
    app.memory().list_memories(with_key(list(), key)).await.map(|_| ()).map_err(|s| s.code())
}

/// ListMemories as `agent` (namespace red) with a JWT.
async fn call_as(app: &TestApp, agent: &str) -> Result<(), Code> {
    app.memory().list_memories(as_agent(list(), agent, "red", "agent")).await.map(|_| ()).map_err(|s| s.code())
}

async fn until<F, Fut>(what: &str, want: Result<(), Code>, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Code>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = call().await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key_id(key: &str) -> String {
    key.split('_').nth(1).expect("tmws_<id>_<secret>").to_string()
}

/// Revokes `key` in SQL with triggers off: nobody is told.
async fn revoke_unannounced(app: &TestApp, key: &str) {
    let sql = format!("UPDATE api_keys SET revoke_time = now() WHERE id = '{}'", key_id(key));
    execute_unannounced(&app.database_url, &[&sql]).await;
}

fn status(agent: &str, status: pb::AgentStatus) -> pb::UpdateAgentRequest {
    pb::UpdateAgentRequest {
        agent: Some(pb::Agent { id: agent.into(), status: status as i32, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["status".into()] }),
        etag: String::new(),
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn found_credentials_are_remembered_and_announced_changes_end_them() {
    let database = fresh_database(&postgres_env()).await;
    let cached = spawn_secure(&database, CACHED).await;
    let uncached = spawn_secure(&database, UNCACHED).await;
    let key = cached.create_key("alice", &[]).await;
    assert_eq!(call_with_key(&cached, &key).await, Ok(()));

    // Unannounced, the revocation is invisible to the cached server: the cache answers.
    revoke_unannounced(&cached, &key).await;
    assert_eq!(call_with_key(&uncached, &key).await, Err(Code::Unauthenticated));
    assert_eq!(call_with_key(&cached, &key).await, Ok(()), "served from the cache");

    // The secret is checked on every call: a wrong one for a remembered key id is refused.
    let wrong = format!("tmws_{}_{}", key_id(&key), "0".repeat(64));
    assert_eq!(call_with_key(&cached, &wrong).await, Err(Code::Unauthenticated));

    // Any announced change, here a plain UPDATE in SQL of another agent, ends it.
    let mut conn = pg_connect(&cached.database_url).await;
    conn.execute("UPDATE agents SET display_name = 'renamed' WHERE id = 'bob'").await.expect("update");
    until("an announced change", Err(Code::Unauthenticated), || call_with_key(&cached, &key)).await;
    cached.stop().await.expect("stop");
    uncached.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn revocations_and_suspensions_on_another_replica_apply_at_once() {
    let database = fresh_database(&postgres_env()).await;
    let one = spawn_secure(&database, CACHED).await;
    let two = spawn_secure(&database, CACHED).await;
    let key = one.create_key("alice", &[]).await;
    assert_eq!(call_with_key(&one, &key).await, Ok(()));
    assert_eq!(call_as(&one, "bob").await, Ok(()));

    two.agents().revoke_api_key(two.admin(pb::RevokeApiKeyRequest { id: key_id(&key) })).await.expect("revoke on two");
    until("a revocation on the other replica", Err(Code::Unauthenticated), || call_with_key(&one, &key)).await;

    two.agents().update_agent(two.admin(status("bob", pb::AgentStatus::Suspended))).await.expect("suspend on two");
    until("a suspension on the other replica", Err(Code::PermissionDenied), || call_as(&one, "bob")).await;
    two.agents().update_agent(two.admin(status("bob", pb::AgentStatus::Active))).await.expect("reactivate on two");
    until("a reactivation on the other replica", Ok(()), || call_as(&one, "bob")).await;
    one.stop().await.expect("stop");
    two.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn a_replica_applies_its_own_revocations_and_suspensions_at_once() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, CACHED).await;
    // Announcements off: the replica's own bookkeeping alone must apply its changes.
    disable_triggers(&app.database_url, &[("agents", "agents_changed"), ("api_keys", "api_keys_changed")]).await;
    for round in 0..5 {
        let key = app.create_key("alice", &[]).await;
        assert_eq!(call_with_key(&app, &key).await, Ok(()));
        app.agents().revoke_api_key(app.admin(pb::RevokeApiKeyRequest { id: key_id(&key) })).await.expect("revoke");
        assert_eq!(call_with_key(&app, &key).await, Err(Code::Unauthenticated), "revoked in round {round}");

        assert_eq!(call_as(&app, "bob").await, Ok(()));
        app.agents().update_agent(app.admin(status("bob", pb::AgentStatus::Suspended))).await.expect("suspend");
        assert_eq!(call_as(&app, "bob").await, Err(Code::PermissionDenied), "suspended in round {round}");
        app.agents().update_agent(app.admin(status("bob", pb::AgentStatus::Active))).await.expect("reactivate");
        assert_eq!(call_as(&app, "bob").await, Ok(()), "active again in round {round}");
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn after_losing_its_listening_connection_the_credential_cache_starts_over() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, CACHED).await;
    let key = app.create_key("alice", &[]).await;
    assert_eq!(call_with_key(&app, &key).await, Ok(()));
    revoke_unannounced(&app, &key).await;
    assert_eq!(call_with_key(&app, &key).await, Ok(()), "cached");

    assert_eq!(terminate_listeners(&app.database_url).await, 1, "one listening connection");
    until("the cache after the listener came back", Err(Code::Unauthenticated), || call_with_key(&app, &key)).await;
    app.stop().await.expect("stop");
}
