//! Authentication and authorization with real credentials: API keys, the principal from the
//! database, namespaces, roles, scopes, the AgentService and the audit log.

use std::time::Duration;

use tonic::Code;

use crate::{
    common::{TestApp, random_api_key, spawn_app_auth, with_key},
    memory::{create, memory},
};
use tmws::pb;

fn list() -> pb::ListMemoriesRequest {
    pb::ListMemoriesRequest::default()
}

/// How many memories namespace `ns` holds (as the admin).
async fn count_in(app: &TestApp, ns: &str) -> usize {
    app.memory()
        .list_memories(app.admin(pb::ListMemoriesRequest {
            namespace: ns.into(),
            page_size: 500,
            ..Default::default()
        }))
        .await
        .expect("admin list")
        .into_inner()
        .memories
        .len()
}

/// Polls the audit log (written in the background for failures) until `pred` holds.
async fn audit_until(
    app: &TestApp,
    filter: pb::ListAuditEventsRequest,
    pred: impl Fn(&[pb::AuditEvent]) -> bool,
) -> Vec<pb::AuditEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = app
            .agents()
            .list_audit_events(app.admin(pb::ListAuditEventsRequest { page_size: 500, ..filter.clone() }))
            .await
            .expect("list audit")
            .into_inner()
            .events;
        if pred(&events) {
            return events;
        }
        assert!(tokio::time::Instant::now() < deadline, "audit condition not met; saw {events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bearer<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", value.parse().expect("ascii"));
    req
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_and_write_nothing() {
    let app = spawn_app_auth(&[]).await;
    let key = app.create_agent("alice", "red", "agent").await;
    let mut m = app.memory();

    // Missing credentials, on every service.
    let s = m.create_memory(create(memory("x"))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = app.agents().who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = app.workflow().list_workflows(pb::ListWorkflowsRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Malformed: wrong scheme, empty, not a key, broken key shapes.
    for value in [
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer ",
        "Bearer nonsense",
        "Bearer tmws_",
        "Bearer tmws_ABC_def",
        "tmws_0123456789abcdef_0123",
    ] {
        let s = m.create_memory(bearer(create(memory("x")), value)).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{value}: {s:?}");
    }
    // Unknown key; known key id with a wrong secret.
    let s = m.create_memory(with_key(create(memory("x")), &random_api_key())).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let (prefix, _) = key.rsplit_once('_').unwrap();
    let forged = format!("{prefix}_{}", "0".repeat(64));
    let s = m.create_memory(with_key(create(memory("x")), &forged)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(!s.message().contains(&"0".repeat(64)), "the secret is never echoed");

    // Expired key.
    let expiring = app
        .agents()
        .create_api_key(with_key(
            pb::CreateApiKeyRequest { ttl: Some(prost_types::Duration { seconds: 1, nanos: 0 }), ..Default::default() },
            &key,
        ))
        .await
        .expect("create expiring key")
        .into_inner();
    m.list_memories(with_key(list(), &expiring.key)).await.expect("valid before expiry");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let s = m.list_memories(with_key(list(), &expiring.key)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("expired"), "{s:?}");

    // Revoked key: refused on the very next call.
    let second = app.create_key("alice", &[]).await;
    m.list_memories(with_key(list(), &second)).await.expect("valid before revocation");
    let id = second.split('_').nth(1).unwrap().to_string();
    let revoked = app
        .agents()
        .revoke_api_key(with_key(pb::RevokeApiKeyRequest { id: id.clone() }, &key))
        .await
        .expect("revoke own key")
        .into_inner();
    assert!(revoked.revoke_time.is_some());
    let s = m.list_memories(with_key(list(), &second)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("revoked"), "{s:?}");

    // Health and reflection need no credentials.
    app.health_status("tmws.v1.MemoryService").await.expect("health without credentials");

    // Nothing was written, and every failure is in the audit log.
    assert_eq!(count_in(&app, "red").await, 0);
    let events = audit_until(
        &app,
        pb::ListAuditEventsRequest { method: "tmws.v1.MemoryService/CreateMemory".into(), ..Default::default() },
        |e| e.iter().filter(|e| e.code == "UNAUTHENTICATED").count() >= 10,
    )
    .await;
    let e = events.iter().find(|e| e.code == "UNAUTHENTICATED").unwrap();
    assert!(!e.peer.is_empty() && !e.request_id.is_empty() && e.time.is_some(), "{e:?}");
    assert!(events.iter().all(|e| !e.detail.contains(&"0".repeat(64))), "no secret in the audit log");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn suspended_agents_are_refused_at_once() {
    let app = spawn_app_auth(&[]).await;
    let key = app.create_agent("sam", "red", "agent").await;
    let mut m = app.memory();
    m.create_memory(with_key(create(memory("before")), &key)).await.expect("active agent writes");

    let suspend = |status: pb::AgentStatus| pb::UpdateAgentRequest {
        agent: Some(pb::Agent { id: "sam".into(), status: status as i32, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["status".into()] }),
        etag: String::new(),
    };
    let updated = app.agents().update_agent(app.admin(suspend(pb::AgentStatus::Suspended))).await.expect("suspend");
    assert_eq!(updated.into_inner().status, pb::AgentStatus::Suspended as i32);
    let s = m.create_memory(with_key(create(memory("after")), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = m.list_memories(with_key(list(), &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    app.agents().update_agent(app.admin(suspend(pb::AgentStatus::Active))).await.expect("reactivate");
    m.list_memories(with_key(list(), &key)).await.expect("active again");
    assert_eq!(count_in(&app, "red").await, 1, "nothing written while suspended");

    // An admin cannot suspend itself (no lock-out by accident).
    let s = app
        .agents()
        .update_agent(app.admin(pb::UpdateAgentRequest {
            agent: Some(pb::Agent {
                id: "admin".into(),
                status: pb::AgentStatus::Suspended as i32,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn the_principal_comes_from_the_database_not_from_the_caller() {
    let app = spawn_app_auth(&[]).await;
    let key = app.create_agent("alice", "red", "agent").await;
    let mut agents = app.agents();

    let me = agents.who_am_i(with_key(pb::WhoAmIRequest {}, &key)).await.expect("whoami").into_inner();
    let agent = me.agent.unwrap();
    assert_eq!((agent.id.as_str(), agent.namespace.as_str(), agent.role), ("alice", "red", pb::Role::Agent as i32));
    assert_eq!(me.credential_type, "api_key");
    assert_eq!(me.api_key_id, key.split('_').nth(1).unwrap());
    assert_eq!(me.scopes.len(), 5, "{:?}", me.scopes);

    // Development identity headers are ignored when authentication is on.
    let mut req = with_key(pb::WhoAmIRequest {}, &key);
    req.metadata_mut().insert("x-tmws-agent-id", "admin".parse().unwrap());
    req.metadata_mut().insert("x-tmws-namespace", "blue".parse().unwrap());
    req.metadata_mut().insert("x-tmws-role", "admin".parse().unwrap());
    let me = agents.who_am_i(req).await.expect("whoami").into_inner().agent.unwrap();
    assert_eq!((me.id.as_str(), me.namespace.as_str(), me.role), ("alice", "red", pb::Role::Agent as i32));

    // A caller naming another namespace in a request field is refused, and nothing is written.
    let mut m = app.memory();
    let spoof =
        pb::CreateMemoryRequest { memory: Some(memory("spoof")), namespace: "blue".into(), ..Default::default() };
    let s = m.create_memory(with_key(spoof, &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = m
        .list_memories(with_key(pb::ListMemoriesRequest { namespace: "blue".into(), ..Default::default() }, &key))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s =
        m.get_memory_stats(with_key(pb::GetMemoryStatsRequest { namespace: "blue".into() }, &key)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(count_in(&app, "blue").await, 0);
    // Without a namespace field the write lands in the caller's own namespace.
    let made = m.create_memory(with_key(create(memory("mine")), &key)).await.expect("create").into_inner();
    assert_eq!((made.namespace.as_str(), made.owner.as_str()), ("red", "alice"));
    // An admin may address another namespace explicitly.
    let admin_made = m
        .create_memory(app.admin(pb::CreateMemoryRequest {
            memory: Some(memory("admin in blue")),
            namespace: "blue".into(),
            ..Default::default()
        }))
        .await
        .expect("admin addresses blue")
        .into_inner();
    assert_eq!(admin_made.namespace, "blue");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn roles_and_access_levels_with_real_keys() {
    let app = spawn_app_auth(&[]).await;
    let alice = app.create_agent("alice", "red", "agent").await;
    let bob = app.create_agent("bob", "red", "agent").await;
    let rita = app.create_agent("rita", "red", "readonly").await;
    let mut m = app.memory();

    let private = m.create_memory(with_key(create(memory("alice private")), &alice)).await.unwrap().into_inner();

    // A read-only agent cannot write (any write method), but can read.
    let s = m.create_memory(with_key(create(memory("ro")), &rita)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = m
        .delete_memory(with_key(pb::DeleteMemoryRequest { id: private.id.clone(), ..Default::default() }, &rita))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    m.list_memories(with_key(list(), &rita)).await.expect("readonly reads");

    // bob cannot read alice's PRIVATE memory: NOT_FOUND (existence is not leaked).
    let s = m
        .get_memory(with_key(pb::GetMemoryRequest { id: private.id.clone(), ..Default::default() }, &bob))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // A non-owner sharing a memory it can see: PERMISSION_DENIED.
    let mut team = memory("alice team");
    team.access_level = pb::AccessLevel::Team as i32;
    let team = m.create_memory(with_key(create(team), &alice)).await.unwrap().into_inner();
    let share = |id: &str| pb::ShareMemoryRequest {
        id: id.into(),
        grant: vec![pb::ShareGrant {
            agent_id: "carol".into(),
            permission: pb::SharePermission::Read as i32,
            expire_time: None,
        }],
        ..Default::default()
    };
    let s = m.share_memory(with_key(share(&team.id), &bob)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let shared = m.share_memory(with_key(share(&team.id), &alice)).await.expect("owner shares").into_inner();
    assert_eq!(shared.shared_with.len(), 1);

    // SYSTEM memories: only admins create or change them.
    let mut system = memory("system rule");
    system.access_level = pb::AccessLevel::System as i32;
    let s = m.create_memory(with_key(create(system.clone()), &alice)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let sys = m
        .create_memory(app.admin(pb::CreateMemoryRequest {
            memory: Some(system),
            namespace: "red".into(),
            ..Default::default()
        }))
        .await
        .expect("admin writes SYSTEM")
        .into_inner();
    let s = m
        .update_memory(with_key(
            pb::UpdateMemoryRequest {
                memory: Some(pb::Memory { id: sys.id.clone(), summary: "hijack".into(), ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["summary".into()] }),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let mut promote = pb::Memory { id: private.id.clone(), ..Default::default() };
    promote.access_level = pb::AccessLevel::System as i32;
    let s = m
        .update_memory(with_key(
            pb::UpdateMemoryRequest {
                memory: Some(promote),
                update_mask: Some(prost_types::FieldMask { paths: vec!["access_level".into()] }),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(count_in(&app, "red").await, 3, "the refused calls wrote nothing");
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn scoped_keys_narrow_and_never_escalate() {
    let app = spawn_app_auth(&[]).await;
    let full = app.create_agent("wes", "red", "agent").await;
    let read_only = app.create_key("wes", &["memory:read"]).await;
    let mut m = app.memory();
    let mut a = app.agents();

    m.list_memories(with_key(list(), &read_only)).await.expect("memory:read lists");
    let s = m.create_memory(with_key(create(memory("x")), &read_only)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("memory:write"), "{s:?}");
    let me = a.who_am_i(with_key(pb::WhoAmIRequest {}, &read_only)).await.unwrap().into_inner();
    assert_eq!(me.scopes, vec!["memory:read".to_string()]);

    // A narrowed key cannot mint a wider one; asking for nothing gives its own scopes.
    let s = a
        .create_api_key(with_key(
            pb::CreateApiKeyRequest { scopes: vec!["memory:write".into()], ..Default::default() },
            &read_only,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let child = a.create_api_key(with_key(pb::CreateApiKeyRequest::default(), &read_only)).await.unwrap().into_inner();
    assert_eq!(child.api_key.unwrap().scopes, vec!["memory:read".to_string()]);
    let s = m.create_memory(with_key(create(memory("x")), &child.key)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Unknown scopes are invalid; a read-only agent cannot hold write scopes.
    let s = a
        .create_api_key(with_key(pb::CreateApiKeyRequest { scopes: vec!["root".into()], ..Default::default() }, &full))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    app.create_agent("rita", "red", "readonly").await;
    let s = a
        .create_api_key(app.admin(pb::CreateApiKeyRequest {
            agent_id: "rita".into(),
            scopes: vec!["memory:write".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // Keys are listed without secrets.
    let keys = a.list_api_keys(with_key(pb::ListApiKeysRequest::default(), &full)).await.unwrap().into_inner();
    assert_eq!(keys.api_keys.len(), 3);
    let listing = format!("{keys:?}");
    for k in [&full, &read_only, &child.key] {
        assert!(!listing.contains(k.rsplit_once('_').unwrap().1), "secret listed");
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn agent_service_rules_and_bad_input() {
    let app = spawn_app_auth(&[]).await;
    let alice = app.create_agent("alice", "red", "agent").await;
    let _carol = app.create_agent("carol", "blue", "agent").await;
    let bob = app.create_agent("bob", "red", "agent").await;
    let mut a = app.agents();

    let new_agent = |id: &str, ns: &str, role: pb::Role| pb::CreateAgentRequest {
        agent: Some(pb::Agent { id: id.into(), namespace: ns.into(), role: role as i32, ..Default::default() }),
        request_id: String::new(),
    };
    // Admin-only methods.
    let s = a.create_agent(with_key(new_agent("x", "red", pb::Role::Admin), &alice)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = a
        .update_agent(with_key(
            pb::UpdateAgentRequest {
                agent: Some(pb::Agent {
                    id: "bob".into(),
                    status: pb::AgentStatus::Suspended as i32,
                    ..Default::default()
                }),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = a.list_audit_events(with_key(pb::ListAuditEventsRequest::default(), &alice)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = a
        .create_api_key(with_key(pb::CreateApiKeyRequest { agent_id: "bob".into(), ..Default::default() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = a
        .list_api_keys(with_key(pb::ListApiKeysRequest { agent_id: "bob".into(), ..Default::default() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // Another agent's key is NOT_FOUND to a non-admin (and stays valid).
    let bob_key_id = bob.split('_').nth(1).unwrap().to_string();
    let s = a.revoke_api_key(with_key(pb::RevokeApiKeyRequest { id: bob_key_id }, &alice)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    a.who_am_i(with_key(pb::WhoAmIRequest {}, &bob)).await.expect("bob's key still works");
    // Agents of another namespace are NOT_FOUND; of one's own namespace visible.
    let s = a.get_agent(with_key(pb::GetAgentRequest { id: "carol".into() }, &alice)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    a.get_agent(with_key(pb::GetAgentRequest { id: "bob".into() }, &alice)).await.expect("same namespace");
    let s = a
        .list_agents(with_key(pb::ListAgentsRequest { namespace: "blue".into(), ..Default::default() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Bad input.
    for (req, field) in [
        (new_agent("bad id!", "red", pb::Role::Agent), "agent.id"),
        (new_agent("ok", "", pb::Role::Agent), "agent.namespace"),
        (new_agent("ok", "red", pb::Role::Unspecified), "agent.role"),
    ] {
        let s = a.create_agent(app.admin(req)).await.unwrap_err();
        crate::memory::assert_invalid(&s, field);
    }
    let s = a.create_agent(app.admin(new_agent("alice", "red", pb::Role::Agent))).await.unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists);
    let s = a
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                expire_time: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = a.get_agent(app.admin(pb::GetAgentRequest { id: "nobody".into() })).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // Idempotent create with request_id; generated ids; pagination.
    let mut req = new_agent("", "green", pb::Role::Agent);
    req.request_id = "make-green-1".into();
    let first = a.create_agent(app.admin(req.clone())).await.expect("create").into_inner();
    let again = a.create_agent(app.admin(req)).await.expect("retry").into_inner();
    assert_eq!(first.id, again.id);
    assert!(uuid::Uuid::parse_str(&first.id).is_ok());
    for i in 0..3 {
        a.create_agent(app.admin(new_agent(&format!("g{i}"), "green", pb::Role::Agent))).await.expect("create");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = a
            .list_agents(app.admin(pb::ListAgentsRequest {
                namespace: "green".into(),
                page_size: 2,
                page_token: token,
            }))
            .await
            .expect("page")
            .into_inner();
        seen.extend(page.agents.into_iter().map(|a| a.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 4);
    let s = a
        .list_agents(app.admin(pb::ListAgentsRequest {
            namespace: "green".into(),
            page_size: -1,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn audit_log_records_changes_and_failures() {
    let app = spawn_app_auth(&[]).await;
    let alice = app.create_agent("alice", "red", "agent").await;
    let bob = app.create_agent("bob", "red", "agent").await;
    let mut m = app.memory();

    let mut req = with_key(create(memory("audited")), &alice);
    req.metadata_mut().insert("x-request-id", "req-create-1".parse().unwrap());
    let resp = m.create_memory(req).await.expect("create");
    assert_eq!(resp.metadata().get("x-request-id").and_then(|v| v.to_str().ok()), Some("req-create-1"));
    let made = resp.into_inner();
    m.update_memory(with_key(
        pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: made.id.clone(), summary: "s".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["summary".into()] }),
            ..Default::default()
        },
        &alice,
    ))
    .await
    .expect("update");
    // bob may not delete alice's memory: the failure is audited too.
    let s = m
        .delete_memory(with_key(pb::DeleteMemoryRequest { id: made.id.clone(), ..Default::default() }, &bob))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    m.delete_memory(with_key(pb::DeleteMemoryRequest { id: made.id.clone(), ..Default::default() }, &alice))
        .await
        .expect("delete");

    let events = audit_until(&app, pb::ListAuditEventsRequest { namespace: "red".into(), ..Default::default() }, |e| {
        e.iter().any(|e| e.agent_id == "bob" && e.code == "NOT_FOUND")
    })
    .await;
    let find = |method: &str, code: &str| {
        events
            .iter()
            .find(|e| e.method == format!("tmws.v1.MemoryService/{method}") && e.code == code)
            .unwrap_or_else(|| panic!("no {method} {code} in {events:#?}"))
    };
    let created = find("CreateMemory", "OK");
    assert_eq!((created.agent_id.as_str(), created.resource_id.as_str()), ("alice", made.id.as_str()));
    assert_eq!(created.request_id, "req-create-1");
    assert!(created.peer.starts_with("127.0.0.1:"), "{created:?}");
    assert_eq!(find("UpdateMemory", "OK").resource_id, made.id);
    assert_eq!(find("DeleteMemory", "OK").resource_id, made.id);
    assert_eq!(find("DeleteMemory", "NOT_FOUND").agent_id, "bob");
    // Reads are not audited.
    assert!(events.iter().all(|e| !e.method.contains("ListMemories")));

    // Filters and keyset pages.
    let by_method = app
        .agents()
        .list_audit_events(app.admin(pb::ListAuditEventsRequest {
            agent_id: "alice".into(),
            method: "tmws.v1.MemoryService/UpdateMemory".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_method.events.len(), 1);
    let future = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 };
    let none = app
        .agents()
        .list_audit_events(app.admin(pb::ListAuditEventsRequest { start_time: Some(future), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
    let mut total = 0;
    let mut token = String::new();
    loop {
        let page = app
            .agents()
            .list_audit_events(app.admin(pb::ListAuditEventsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        total += page.events.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(total >= events.len(), "{total} < {}", events.len());
    let s = app
        .agents()
        .list_audit_events(app.admin(pb::ListAuditEventsRequest { page_token: "forged".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn audit_retention_sweeper_deletes_old_events() {
    let app = spawn_app_auth(&[("TMWS_AUDIT_RETENTION", "1s"), ("TMWS_AUDIT_SWEEP_INTERVAL", "200ms")]).await;
    let key = app.create_agent("alice", "red", "agent").await;
    app.memory().create_memory(with_key(create(memory("x")), &key)).await.expect("create");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = app
            .agents()
            .list_audit_events(app.admin(pb::ListAuditEventsRequest {
                method: "tmws.v1.MemoryService/CreateMemory".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .events;
        if events.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "old audit events were not swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn cli_creates_an_agent_and_prints_its_key_once() {
    use tokio::process::Command;
    let app = spawn_app_auth(&[]).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tmws"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TMWS_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["agents", "create", "--namespace", "ops", "--role", "admin", "--id", "ops-admin"])
        .env("TMWS_DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run tmws agents create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().rev().find(|l| l.starts_with("tmws_")).unwrap_or_default().to_string();
    assert!(key.starts_with("tmws_"), "{key}");
    let me = app.agents().who_am_i(with_key(pb::WhoAmIRequest {}, &key)).await.expect("cli key works").into_inner();
    let agent = me.agent.unwrap();
    assert_eq!((agent.id.as_str(), agent.namespace.as_str(), agent.role), ("ops-admin", "ops", pb::Role::Admin as i32));
    // The same id again is refused.
    let again = Command::new(env!("CARGO_BIN_EXE_tmws"))
        .args(["agents", "create", "--namespace", "ops", "--role", "admin", "--id", "ops-admin"])
        .env("TMWS_DATABASE_URL", &app.database_url)
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
    app.stop().await.expect("stop");
}
