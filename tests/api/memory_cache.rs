//! The memory read cache (PostgreSQL), as GetMemory uses it: it serves repeated reads, every caller still sees
//! exactly what the database would show them, and changes made anywhere — another replica, this
//! one, plain SQL — are seen at once, also after the listening connection was lost.
//!
//! The cached servers here keep entries for an hour (TMWS_MEMORY_CACHE_TTL=1h), so only the
//! change announcements can make a change visible within these tests' deadlines.

use std::time::Duration;

use sqlx::Executor;
use tonic::Code;

use crate::{
    common::{
        TestApp, as_agent, disable_triggers, execute_unannounced, fresh_database, pg_connect, postgres_env,
        spawn_secure, terminate_listeners,
    },
    memory::{create, memory},
};
use tmws::pb;

const CACHED: &[(&str, &str)] = &[("TMWS_MEMORY_CACHE_TTL", "1h")];
const UNCACHED: &[(&str, &str)] = &[("TMWS_MEMORY_CACHE_BYTES", "0")];

fn alice<T>(m: T) -> tonic::Request<T> {
    as_agent(m, "alice", "red", "agent")
}

fn get_req(id: &str) -> pb::GetMemoryRequest {
    pb::GetMemoryRequest { id: id.into(), ..Default::default() }
}

/// GetMemory as `agent`: the content, or the status code.
async fn read(app: &TestApp, id: &str, agent: (&str, &str, &str)) -> Result<String, Code> {
    let (a, ns, role) = agent;
    app.memory()
        .get_memory(as_agent(get_req(id), a, ns, role))
        .await
        .map(|r| r.into_inner().content)
        .map_err(|s| s.code())
}

/// Reads until the answer is `want`, for at most five seconds.
async fn read_until(app: &TestApp, id: &str, agent: (&str, &str, &str), want: Result<&str, Code>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = read(app, id, agent).await;
        if got.as_deref().map_err(|c| *c) == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ALICE: (&str, &str, &str) = ("alice", "red", "agent");
const CAROL: (&str, &str, &str) = ("carol", "blue", "agent");

async fn create_as_alice(app: &TestApp, content: &str, level: pb::AccessLevel) -> String {
    let mut m = memory(content);
    m.access_level = level as i32;
    app.memory().create_memory(alice(create(m))).await.expect("create").into_inner().id
}

/// Changes the content in SQL with triggers off: nobody is told.
async fn change_unannounced(app: &TestApp, id: &str, content: &str) {
    let id: uuid::Uuid = id.parse().expect("uuid");
    execute_unannounced(&app.database_url, &[&format!("UPDATE memories SET content = '{content}' WHERE id = '{id}'")])
        .await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn repeated_reads_are_served_from_the_cache_and_announced_changes_end_them() {
    let database = fresh_database(&postgres_env()).await;
    let cached = spawn_secure(&database, CACHED).await;
    let uncached = spawn_secure(&database, UNCACHED).await;
    let id = create_as_alice(&cached, "first words", pb::AccessLevel::Private).await;
    assert_eq!(read(&cached, &id, ALICE).await.as_deref(), Ok("first words"));

    // Unannounced, the change is invisible to the cached server and visible to the other: the
    // cache is really what answers.
    change_unannounced(&cached, &id, "changed behind its back").await;
    assert_eq!(read(&uncached, &id, ALICE).await.as_deref(), Ok("changed behind its back"));
    for _ in 0..3 {
        assert_eq!(read(&cached, &id, ALICE).await.as_deref(), Ok("first words"), "served from the cache");
    }
    // The FULL view (with the vector) always reads the row.
    let full = cached
        .memory()
        .get_memory(alice(pb::GetMemoryRequest { view: pb::MemoryView::Full as i32, ..get_req(&id) }))
        .await
        .expect("full view")
        .into_inner();
    assert_eq!(full.content, "changed behind its back");

    // Any announced change, here a plain UPDATE in SQL, reaches it.
    let mut conn = pg_connect(&cached.database_url).await;
    sqlx::query("UPDATE memories SET content = 'changed in SQL' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut conn)
        .await
        .expect("update");
    read_until(&cached, &id, ALICE, Ok("changed in SQL"), "a change made in SQL").await;
    sqlx::query("DELETE FROM memories WHERE id = $1::uuid").bind(&id).execute(&mut conn).await.expect("delete");
    read_until(&cached, &id, ALICE, Err(Code::NotFound), "a deletion made in SQL").await;
    cached.stop().await.expect("stop");
    uncached.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn changes_on_another_replica_reach_the_cache() {
    let database = fresh_database(&postgres_env()).await;
    let one = spawn_secure(&database, CACHED).await;
    let two = spawn_secure(&database, CACHED).await;
    let id = create_as_alice(&one, "version one", pb::AccessLevel::Shared).await;
    assert_eq!(read(&one, &id, ALICE).await.as_deref(), Ok("version one"));
    assert_eq!(read(&one, &id, CAROL).await, Err(Code::NotFound));

    let updated = two
        .memory()
        .update_memory(alice(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: id.clone(), content: "version two".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["content".into()] }),
            ..Default::default()
        }))
        .await
        .expect("update on two")
        .into_inner();
    read_until(&one, &id, ALICE, Ok("version two"), "an update on the other replica").await;
    let got = one.memory().get_memory(alice(get_req(&id))).await.expect("get").into_inner();
    assert_eq!(got.etag, updated.etag);

    // A grant made on two lets carol read on one; its revocation hides it again.
    let share = |grant: Vec<pb::ShareGrant>, revoke: Vec<String>| {
        let mut c = two.memory();
        let id = id.clone();
        async move {
            c.share_memory(alice(pb::ShareMemoryRequest { id, grant, revoke, ..Default::default() }))
                .await
                .expect("share on two");
        }
    };
    share(
        vec![pb::ShareGrant {
            agent_id: "carol".into(),
            permission: pb::SharePermission::Read as i32,
            expire_time: None,
        }],
        vec![],
    )
    .await;
    read_until(&one, &id, CAROL, Ok("version two"), "a grant made on the other replica").await;
    share(vec![], vec!["carol".into()]).await;
    read_until(&one, &id, CAROL, Err(Code::NotFound), "a revocation made on the other replica").await;
    assert_eq!(read(&one, &id, ALICE).await.as_deref(), Ok("version two"));

    two.memory()
        .delete_memory(alice(pb::DeleteMemoryRequest { id: id.clone(), ..Default::default() }))
        .await
        .expect("delete on two");
    read_until(&one, &id, ALICE, Err(Code::NotFound), "a deletion on the other replica").await;
    one.stop().await.expect("stop");
    two.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn a_replica_reads_its_own_writes_at_once() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, CACHED).await;
    let mut c = app.memory();
    // Announcements off: the replica's own bookkeeping alone must keep its reads fresh.
    disable_triggers(
        &app.database_url,
        &[
            ("memories", "memories_updated"),
            ("memories", "memories_deleted"),
            ("memory_grants", "memory_grants_inserted"),
            ("memory_grants", "memory_grants_updated"),
            ("memory_grants", "memory_grants_deleted"),
        ],
    )
    .await;
    let id = create_as_alice(&app, "round 0", pb::AccessLevel::Shared).await;
    // No waiting anywhere: every read right after a write must show it.
    for round in 1..=20 {
        assert!(read(&app, &id, ALICE).await.is_ok());
        let content = format!("round {round}");
        c.update_memory(alice(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory { id: id.clone(), content: content.clone(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["content".into()] }),
            ..Default::default()
        }))
        .await
        .expect("update");
        assert_eq!(read(&app, &id, ALICE).await, Ok(content.clone()), "round {round}");

        assert_eq!(read(&app, &id, CAROL).await, Err(Code::NotFound));
        c.share_memory(alice(pb::ShareMemoryRequest {
            id: id.clone(),
            grant: vec![pb::ShareGrant {
                agent_id: "carol".into(),
                permission: pb::SharePermission::Read as i32,
                expire_time: None,
            }],
            ..Default::default()
        }))
        .await
        .expect("share");
        assert_eq!(read(&app, &id, CAROL).await, Ok(content.clone()), "granted in round {round}");
        c.share_memory(alice(pb::ShareMemoryRequest {
            id: id.clone(),
            revoke: vec!["carol".into()],
            ..Default::default()
        }))
        .await
        .expect("revoke");
        assert_eq!(read(&app, &id, CAROL).await, Err(Code::NotFound), "revoked in round {round}");
    }
    // Pruning (here: everything older than now with importance <= 1) drops what it deleted.
    assert!(read(&app, &id, ALICE).await.is_ok());
    c.prune_memories(alice(pb::PruneMemoriesRequest {
        older_than: Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 1, nanos: 0 }),
        max_importance: Some(1.0),
        ..Default::default()
    }))
    .await
    .expect("prune");
    assert_eq!(read(&app, &id, ALICE).await, Err(Code::NotFound), "pruned");

    let id = create_as_alice(&app, "short-lived", pb::AccessLevel::Private).await;
    assert!(read(&app, &id, ALICE).await.is_ok());
    c.delete_memory(alice(pb::DeleteMemoryRequest { id: id.clone(), ..Default::default() })).await.expect("delete");
    assert_eq!(read(&app, &id, ALICE).await, Err(Code::NotFound));
    app.stop().await.expect("stop");
}

/// Every roster agent gets from a warm cache what the database gives it, before and after a
/// grant and a memory expire.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn every_caller_sees_from_the_cache_what_the_database_shows_them() {
    let database = fresh_database(&postgres_env()).await;
    let cached = spawn_secure(&database, CACHED).await;
    let uncached = spawn_secure(&database, UNCACHED).await;
    let mut ids = Vec::new();
    for level in [pb::AccessLevel::Private, pb::AccessLevel::Team, pb::AccessLevel::Shared, pb::AccessLevel::Public] {
        ids.push(create_as_alice(&cached, &format!("{level:?}"), level).await);
    }
    let mut sys = memory("system");
    sys.access_level = pb::AccessLevel::System as i32;
    ids.push(
        cached
            .memory()
            .create_memory(as_agent(create(sys), "root", "red", "admin"))
            .await
            .expect("create")
            .into_inner()
            .id,
    );
    // A memory that expires, and a grant that expires, in two seconds.
    let soon = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 2, nanos: 0 };
    let mut expiring = memory("expiring");
    expiring.access_level = pb::AccessLevel::Public as i32;
    expiring.expire_time = Some(soon);
    ids.push(cached.memory().create_memory(alice(create(expiring))).await.expect("create").into_inner().id);
    let granted = create_as_alice(&cached, "granted for a while", pb::AccessLevel::Shared).await;
    cached
        .memory()
        .share_memory(alice(pb::ShareMemoryRequest {
            id: granted.clone(),
            grant: vec![pb::ShareGrant {
                agent_id: "carol".into(),
                permission: pb::SharePermission::Read as i32,
                expire_time: Some(soon),
            }],
            ..Default::default()
        }))
        .await
        .expect("share");
    ids.push(granted);

    let agents = [
        ("alice", "red", "agent"),
        ("bob", "red", "agent"),
        ("carol", "blue", "agent"),
        ("root", "red", "admin"),
        ("rita", "red", "readonly"),
        ("dev-agent", "default", "agent"),
    ];
    let compare = |phase: &'static str| {
        let ids = ids.clone();
        let (cached, uncached) = (&cached, &uncached);
        async move {
            let mut visible = 0;
            for id in &ids {
                // Warm the cache as the owner (or read the row again after it expired).
                let _ = read(cached, id, ALICE).await;
                let _ = read(cached, id, ("root", "red", "admin")).await;
                for agent in agents {
                    let want = read(uncached, id, agent).await;
                    let got = read(cached, id, agent).await;
                    assert_eq!(got, want, "{phase}: {agent:?} reading {id}");
                    visible += usize::from(got.is_ok());
                }
            }
            visible
        }
    };
    let before = compare("before expiry").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = compare("after expiry").await;
    // The matrix is not trivial: something became invisible (the expired memory to all, the
    // expired grant to carol).
    assert!(after < before && after > 0, "visible answers: {before} before, {after} after");
    assert_eq!(read(&cached, &ids[5], ALICE).await, Err(Code::NotFound), "an expired memory is nobody's");
    assert_eq!(read(&cached, &ids[6], CAROL).await, Err(Code::NotFound), "an expired grant shows nothing");
    cached.stop().await.expect("stop");
    uncached.stop().await.expect("stop");
}

#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn after_losing_its_listening_connection_the_cache_starts_over() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, CACHED).await;
    let id = create_as_alice(&app, "before the loss", pb::AccessLevel::Private).await;
    assert_eq!(read(&app, &id, ALICE).await.as_deref(), Ok("before the loss"));
    change_unannounced(&app, &id, "unannounced").await;
    assert_eq!(read(&app, &id, ALICE).await.as_deref(), Ok("before the loss"), "cached");

    // Kill the server's LISTEN connection: changes made until it listens again go unheard, so
    // the cache must forget everything it had.
    assert_eq!(terminate_listeners(&app.database_url).await, 1, "one listening connection");
    read_until(&app, &id, ALICE, Ok("unannounced"), "the cache after the listener came back").await;

    // And it listens again: announced changes still arrive.
    assert_eq!(read(&app, &id, ALICE).await.as_deref(), Ok("unannounced"));
    let mut conn = pg_connect(&app.database_url).await;
    sqlx::query("UPDATE memories SET content = 'announced again' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&mut conn)
        .await
        .expect("update");
    read_until(&app, &id, ALICE, Ok("announced again"), "a change after reconnecting").await;
    app.stop().await.expect("stop");
}

/// The next notification within half a second, if any.
async fn next(listener: &mut sqlx::postgres::PgListener) -> Option<sqlx::postgres::PgNotification> {
    tokio::time::timeout(Duration::from_millis(500), listener.recv()).await.ok().map(|n| n.expect("notification"))
}

/// `ALTER DATABASE … SET tmws.announce_changes = off` (migration 0014; for deployments with
/// every read cache off) stops the announcements; unset or `on`, they are sent.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn announcements_can_be_switched_off_for_the_database() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, UNCACHED).await;
    let id = create_as_alice(&app, "announced or not", pb::AccessLevel::Private).await;
    let mut listener = sqlx::postgres::PgListener::connect(&database).await.expect("listen");
    listener.listen_all(["tmws_memory", "tmws_identity"]).await.expect("listen");
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut pg_connect(&database).await)
        .await
        .expect("database name");
    let update = |sql: String| {
        let database = database.clone();
        async move {
            // A new session picks up the database's settings.
            pg_connect(&database).await.execute(sql.as_str()).await.expect("update");
        }
    };

    update(format!("UPDATE memories SET importance = 0.7 WHERE id = '{id}'")).await;
    let n = next(&mut listener).await.expect("announced by default");
    assert_eq!((n.channel(), n.payload()), ("tmws_memory", id.as_str()));
    update("UPDATE agents SET display_name = 'x' WHERE id = 'bob'".into()).await;
    assert_eq!(next(&mut listener).await.expect("identity announced").channel(), "tmws_identity");

    update(format!("ALTER DATABASE \"{name}\" SET tmws.announce_changes = off")).await;
    update(format!("UPDATE memories SET importance = 0.8 WHERE id = '{id}'")).await;
    update("UPDATE agents SET display_name = 'y' WHERE id = 'bob'".into()).await;
    update(format!("DELETE FROM memories WHERE id = '{id}'")).await;
    assert!(next(&mut listener).await.is_none(), "nothing announced while switched off");

    update(format!("ALTER DATABASE \"{name}\" SET tmws.announce_changes = on")).await;
    update("UPDATE agents SET display_name = 'z' WHERE id = 'bob'".into()).await;
    assert_eq!(next(&mut listener).await.expect("announced again").channel(), "tmws_identity");
    app.stop().await.expect("stop");
}

/// SearchMemories (SEMANTIC or HYBRID) as `agent` for `text`: the contents of the hits, best
/// first.
async fn search_contents(app: &TestApp, text: &str, mode: pb::SearchMode, agent: (&str, &str, &str)) -> Vec<String> {
    let (a, ns, role) = agent;
    let req = pb::SearchMemoriesRequest { query: text.into(), mode: mode as i32, top_k: 10, ..Default::default() };
    app.memory()
        .search_memories(as_agent(req, a, ns, role))
        .await
        .expect("search")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.memory.expect("memory").content)
        .collect()
}

/// With the cache on, searches rank ids in SQL and take the memories from the cache: the
/// database still decides what matches and who may see it, the cache only supplies the rows,
/// and announced changes reach them as they reach GetMemory.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn searches_take_ranked_memories_from_the_cache() {
    let database = fresh_database(&postgres_env()).await;
    let cached = spawn_secure(&database, CACHED).await;
    let uncached = spawn_secure(&database, UNCACHED).await;
    let team = create_as_alice(&cached, "harbour crane schedule", pb::AccessLevel::Team).await;
    let private = create_as_alice(&cached, "harbour crane budget", pb::AccessLevel::Private).await;
    const BOB: (&str, &str, &str) = ("bob", "red", "agent");
    for mode in [pb::SearchMode::Semantic, pb::SearchMode::Hybrid] {
        let mut got = search_contents(&cached, "harbour crane", mode, ALICE).await;
        got.sort();
        assert_eq!(got, ["harbour crane budget", "harbour crane schedule"], "{mode:?}");
        assert_eq!(search_contents(&cached, "harbour crane", mode, BOB).await, ["harbour crane schedule"]);
    }

    // Cached now: an unannounced change of the content is not seen by the cached server's
    // searches, and is by the uncached one's (which read the rows).
    change_unannounced(&cached, &team, "harbour crane timetable").await;
    assert_eq!(
        search_contents(&uncached, "harbour crane", pb::SearchMode::Semantic, BOB).await,
        ["harbour crane timetable"]
    );
    for mode in [pb::SearchMode::Semantic, pb::SearchMode::Hybrid] {
        assert_eq!(
            search_contents(&cached, "harbour crane", mode, BOB).await,
            ["harbour crane schedule"],
            "{mode:?} served from the cache"
        );
    }
    // Asking for the vectors reads the rows.
    let full = cached
        .memory()
        .search_memories(as_agent(
            pb::SearchMemoriesRequest {
                query: "harbour crane".into(),
                mode: pb::SearchMode::Semantic as i32,
                view: pb::MemoryView::Full as i32,
                ..Default::default()
            },
            "bob",
            "red",
            "agent",
        ))
        .await
        .expect("full view")
        .into_inner();
    assert_eq!(full.results.len(), 1);
    assert_eq!(full.results[0].memory.as_ref().map(|m| m.content.as_str()), Some("harbour crane timetable"));

    // Who may see a memory is the database's answer, whatever the cache holds: the private one,
    // cached as private, made TEAM behind the cache's back, is found by bob (the row is read
    // again, since the cached copy would hide it) ...
    execute_unannounced(
        &cached.database_url,
        &[&format!(
            "UPDATE memories SET access_level = 2, content = 'harbour crane budget, shared' WHERE id = '{private}'"
        )],
    )
    .await;
    let mut got = search_contents(&cached, "harbour crane", pb::SearchMode::Semantic, BOB).await;
    got.sort();
    assert_eq!(got, ["harbour crane budget, shared", "harbour crane schedule"]);
    // ... and the team one, made PRIVATE behind its back, is not, though its cached copy says TEAM.
    execute_unannounced(&cached.database_url, &[&format!("UPDATE memories SET access_level = 1 WHERE id = '{team}'")])
        .await;
    assert_eq!(
        search_contents(&cached, "harbour crane", pb::SearchMode::Semantic, BOB).await,
        ["harbour crane budget, shared"]
    );

    // An announced change reaches the searches.
    let mut conn = pg_connect(&cached.database_url).await;
    sqlx::query("UPDATE memories SET content = 'harbour crane accounts' WHERE id = $1::uuid")
        .bind(&private)
        .execute(&mut conn)
        .await
        .expect("update");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = search_contents(&cached, "harbour crane", pb::SearchMode::Semantic, BOB).await;
        if got == ["harbour crane accounts"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "an announced change: still {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cached.stop().await.expect("stop");
    uncached.stop().await.expect("stop");
}

/// Searches whose results the cache mostly lacks read their rows at once again (one statement
/// instead of two), and go back to the cache once it holds what they find.
#[tokio::test]
#[ignore = "needs PostgreSQL and Redis"]
async fn searches_read_rows_while_the_cache_lacks_their_results() {
    let database = fresh_database(&postgres_env()).await;
    let app = spawn_secure(&database, CACHED).await;
    let words = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heath", "indigo", "jasper"];
    let mut ids = Vec::new();
    for a in &words[..5] {
        for b in &words[5..] {
            let content = format!("{a} {b}");
            ids.push((create_as_alice(&app, &content, pb::AccessLevel::Private).await, content));
        }
    }
    let top1 = |text: String| {
        let app = &app;
        async move {
            let req = pb::SearchMemoriesRequest {
                query: text,
                mode: pb::SearchMode::Semantic as i32,
                top_k: 1,
                ..Default::default()
            };
            let res = app.memory().search_memories(alice(req)).await.expect("search").into_inner();
            res.results.into_iter().map(|r| r.memory.expect("memory").content).collect::<Vec<_>>()
        }
    };
    // Twenty-five searches, each finding a memory not cached yet: the cache stops being used.
    for (_, content) in &ids {
        assert_eq!(top1(content.clone()).await, [content.as_str()]);
    }
    let (first, content) = &ids[0];
    change_unannounced(&app, first, "amber fjord, rewritten").await;
    assert_eq!(top1(content.clone()).await, ["amber fjord, rewritten"], "the row is read, not the cached copy");

    // Searches that find cached memories bring the cache back into use.
    for (_, content) in &ids[1..12] {
        assert_eq!(top1(content.clone()).await, [content.as_str()]);
    }
    let (second, content) = &ids[1];
    change_unannounced(&app, second, "amber garnet, rewritten").await;
    assert_eq!(top1(content.clone()).await, [content.as_str()], "served from the cache again");
    app.stop().await.expect("stop");
}
