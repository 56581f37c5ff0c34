//! Access levels across two namespaces and three agents, enforced in SQL (no existence leaks).

use std::collections::HashSet;

use tonic::Code;

use crate::{
    common::{as_agent, spawn_app_env},
    memory::{create, memory},
};
use tmws::pb;

// alice and bob share namespace "red"; carol lives in "blue"; root is red's admin; rita is a
// read-only agent of red.
const RED: &str = "red";
const BLUE: &str = "blue";

fn alice<T>(m: T) -> tonic::Request<T> {
    as_agent(m, "alice", RED, "agent")
}

fn level(content: &str, level: pb::AccessLevel) -> pb::CreateMemoryRequest {
    let mut m = memory(content);
    m.access_level = level as i32;
    m.tags = vec!["shared-tag".into()];
    create(m)
}

#[tokio::test]
async fn access_levels_decide_who_sees_what() {
    let app = spawn_app_env(&[]).await;
    let mut c = app.memory();
    let mk = |c: &mut pb::memory_service_client::MemoryServiceClient<_>, req| {
        let mut c = c.clone();
        async move { c.create_memory(req).await.expect("create").into_inner().id }
    };
    let private = mk(&mut c, alice(level("alice private", pb::AccessLevel::Private))).await;
    let team = mk(&mut c, alice(level("alice team", pb::AccessLevel::Team))).await;
    let shared = mk(&mut c, alice(level("alice shared", pb::AccessLevel::Shared))).await;
    let public = mk(&mut c, alice(level("alice public", pb::AccessLevel::Public))).await;
    let system = mk(&mut c, as_agent(level("root system", pb::AccessLevel::System), "root", RED, "admin")).await;

    // alice shares with carol (another namespace), READ only.
    c.share_memory(alice(pb::ShareMemoryRequest {
        id: shared.clone(),
        grant: vec![pb::ShareGrant {
            agent_id: "carol".into(),
            permission: pb::SharePermission::Read as i32,
            expire_time: None,
        }],
        ..Default::default()
    }))
    .await
    .expect("share");

    let reader = c.clone();
    let visible = |agent: &'static str, ns: &'static str, role: &'static str| {
        let mut c = reader.clone();
        let ids = [private.clone(), team.clone(), shared.clone(), public.clone(), system.clone()];
        async move {
            let mut seen = HashSet::new();
            for id in ids {
                match c
                    .get_memory(as_agent(
                        pb::GetMemoryRequest { id: id.clone(), ..Default::default() },
                        agent,
                        ns,
                        role,
                    ))
                    .await
                {
                    Ok(_) => {
                        seen.insert(id);
                    }
                    Err(s) => assert_eq!(
                        s.code(),
                        Code::NotFound,
                        "an invisible memory is NOT_FOUND, never PERMISSION_DENIED"
                    ),
                }
            }
            seen
        }
    };
    let set = |ids: &[&String]| ids.iter().map(|s| (*s).clone()).collect::<HashSet<_>>();
    assert_eq!(visible("alice", RED, "agent").await, set(&[&private, &team, &shared, &public, &system]));
    assert_eq!(visible("bob", RED, "agent").await, set(&[&team, &public, &system]));
    assert_eq!(visible("carol", BLUE, "agent").await, set(&[&shared, &public, &system]));
    assert_eq!(visible("root", RED, "admin").await, set(&[&private, &team, &shared, &public, &system]));

    // List and search apply the same rules inside the query: bob's listing of red.
    let listed = c
        .list_memories(as_agent(pb::ListMemoriesRequest::default(), "bob", RED, "agent"))
        .await
        .expect("list")
        .into_inner();
    let listed: HashSet<String> = listed.memories.into_iter().map(|m| m.id).collect();
    assert_eq!(listed, set(&[&team, &public, &system]));
    let found = c
        .search_memories(as_agent(
            pb::SearchMemoriesRequest { query: "alice".into(), top_k: 10, ..Default::default() },
            "bob",
            RED,
            "agent",
        ))
        .await
        .expect("search")
        .into_inner();
    assert!(found.results.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.id != private && m.id != shared)));
    assert!(!found.results.is_empty());

    // Writes: TEAM is readable but not writable by bob; SYSTEM only by admins.
    let upd = |id: &String, who: &'static str, ns: &'static str, role: &'static str| {
        as_agent(
            pb::UpdateMemoryRequest {
                memory: Some(pb::Memory { id: id.clone(), summary: format!("edited by {who}"), ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["summary".into()] }),
                ..Default::default()
            },
            who,
            ns,
            role,
        )
    };
    assert_eq!(c.update_memory(upd(&team, "bob", RED, "agent")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(c.update_memory(upd(&private, "bob", RED, "agent")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.update_memory(upd(&system, "alice", RED, "agent")).await.unwrap_err().code(), Code::PermissionDenied);
    c.update_memory(upd(&system, "root", RED, "admin")).await.expect("admin writes SYSTEM");
    assert_eq!(c.update_memory(upd(&shared, "carol", BLUE, "agent")).await.unwrap_err().code(), Code::PermissionDenied);
    let sys = c.create_memory(as_agent(level("not allowed", pb::AccessLevel::System), "alice", RED, "agent")).await;
    assert_eq!(sys.unwrap_err().code(), Code::PermissionDenied);

    // A WRITE grant lets carol edit; only the owner (or an admin) may share.
    c.share_memory(alice(pb::ShareMemoryRequest {
        id: shared.clone(),
        grant: vec![pb::ShareGrant {
            agent_id: "carol".into(),
            permission: pb::SharePermission::Write as i32,
            expire_time: None,
        }],
        ..Default::default()
    }))
    .await
    .expect("upgrade grant");
    c.update_memory(upd(&shared, "carol", BLUE, "agent")).await.expect("carol edits with a WRITE grant");
    let reshare = c
        .share_memory(as_agent(
            pb::ShareMemoryRequest {
                id: shared.clone(),
                grant: vec![pb::ShareGrant {
                    agent_id: "bob".into(),
                    permission: pb::SharePermission::Read as i32,
                    expire_time: None,
                }],
                ..Default::default()
            },
            "carol",
            BLUE,
            "agent",
        ))
        .await
        .unwrap_err();
    assert_eq!(reshare.code(), Code::PermissionDenied, "a grantee may not re-share");
    let by_bob = c
        .share_memory(as_agent(
            pb::ShareMemoryRequest {
                id: team.clone(),
                grant: vec![pb::ShareGrant {
                    agent_id: "carol".into(),
                    permission: pb::SharePermission::Read as i32,
                    expire_time: None,
                }],
                ..Default::default()
            },
            "bob",
            RED,
            "agent",
        ))
        .await
        .unwrap_err();
    assert_eq!(by_bob.code(), Code::PermissionDenied, "a non-owner may not share");

    // Revoking removes carol's access at once.
    c.share_memory(alice(pb::ShareMemoryRequest {
        id: shared.clone(),
        revoke: vec!["carol".into()],
        ..Default::default()
    }))
    .await
    .expect("revoke");
    assert!(!visible("carol", BLUE, "agent").await.contains(&shared));

    // Read-only agents cannot write; non-admins cannot address another namespace.
    let ro = c.create_memory(as_agent(create(memory("nope")), "rita", RED, "readonly")).await.unwrap_err();
    assert_eq!(ro.code(), Code::PermissionDenied);
    let mut cross = create(memory("into blue"));
    cross.namespace = BLUE.into();
    let spoof = c.create_memory(as_agent(cross.clone(), "alice", RED, "agent")).await.unwrap_err();
    assert_eq!(spoof.code(), Code::PermissionDenied);
    let list_blue = c
        .list_memories(as_agent(
            pb::ListMemoriesRequest { namespace: BLUE.into(), ..Default::default() },
            "alice",
            RED,
            "agent",
        ))
        .await
        .unwrap_err();
    assert_eq!(list_blue.code(), Code::PermissionDenied);
    let made =
        c.create_memory(as_agent(cross, "root", RED, "admin")).await.expect("admin may address blue").into_inner();
    assert_eq!(made.namespace, BLUE);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn expired_grants_stop_applying() {
    let app = spawn_app_env(&[]).await;
    let mut c = app.memory();
    let id = c
        .create_memory(as_agent(level("briefly shared", pb::AccessLevel::Shared), "alice", RED, "agent"))
        .await
        .expect("create")
        .into_inner()
        .id;
    let soon = tmws::api::convert::to_timestamp(chrono::Utc::now() + chrono::Duration::milliseconds(800));
    c.share_memory(as_agent(
        pb::ShareMemoryRequest {
            id: id.clone(),
            grant: vec![pb::ShareGrant {
                agent_id: "bob".into(),
                permission: pb::SharePermission::Read as i32,
                expire_time: Some(soon),
            }],
            ..Default::default()
        },
        "alice",
        RED,
        "agent",
    ))
    .await
    .expect("share");
    let get = |c: &mut pb::memory_service_client::MemoryServiceClient<_>| {
        let mut c = c.clone();
        let id = id.clone();
        async move { c.get_memory(as_agent(pb::GetMemoryRequest { id, ..Default::default() }, "bob", RED, "agent")).await }
    };
    get(&mut c).await.expect("bob reads while the grant lasts");
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(get(&mut c).await.unwrap_err().code(), Code::NotFound);
    app.stop().await.expect("stop");
}
