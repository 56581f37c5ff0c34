//! Test harness: spawns the real server in-process on `127.0.0.1:0`, on its own fresh store, and
//! hands out real tonic clients over TCP. One suite, two backends: with `TMWS_TEST_DATABASE_URL`
//! (an admin URL) and `TMWS_TEST_REDIS_URL` set, every test gets a freshly created PostgreSQL
//! database and the Redis; without them, every test gets a fresh embedded SQLite file and no
//! Redis. `scripts/test.sh` runs the suite both ways.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub mod embed_server;

use sqlx::{Connection, Executor, PgConnection};
use tmws::{
    config::Config,
    pb::{
        self, agent_service_client::AgentServiceClient, memory_service_client::MemoryServiceClient,
        workflow_service_client::WorkflowServiceClient,
    },
    server::RunningServer,
};
use tokio::{net::TcpListener, sync::Mutex, task::JoinSet};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Which backend the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// The embedded store, one fresh file per test (no services needed).
    Sqlite,
    /// PostgreSQL + pgvector (a fresh database per test) and Redis.
    Postgres,
}

pub struct TestEnv {
    pub backend: TestBackend,
    /// Admin URL of the PostgreSQL server (empty on SQLite).
    pub admin_database_url: String,
    pub redis_url: Option<String>,
}

impl TestEnv {
    /// The Redis URL test servers use (none on the embedded backend).
    pub fn redis(&self) -> Option<&str> {
        self.redis_url.as_deref()
    }

    /// The Redis URL, for tests that exercise Redis itself (they are marked
    /// `#[ignore = "needs PostgreSQL and Redis"]` and run by scripts/test.sh's second pass).
    pub fn require_redis(&self) -> &str {
        self.redis_url.as_deref().expect("this test needs TMWS_TEST_REDIS_URL (run it through scripts/test.sh)")
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == TestBackend::Postgres
    }
}

/// The backend under test: PostgreSQL + Redis when `TMWS_TEST_DATABASE_URL` is set (then
/// `TMWS_TEST_REDIS_URL` must be set too), otherwise the embedded SQLite store.
pub fn test_env() -> TestEnv {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match get("TMWS_TEST_DATABASE_URL") {
        Some(url) => TestEnv {
            backend: TestBackend::Postgres,
            admin_database_url: url,
            redis_url: Some(get("TMWS_TEST_REDIS_URL").unwrap_or_else(|| {
                panic!("TMWS_TEST_DATABASE_URL is set but TMWS_TEST_REDIS_URL is not: run the tests through scripts/test.sh")
            })),
        },
        None => TestEnv { backend: TestBackend::Sqlite, admin_database_url: String::new(), redis_url: None },
    }
}

/// A test that only makes sense on PostgreSQL + Redis (outages through a proxy, replicas sharing
/// one database, Redis-backed limits): fails loudly if the suite runs on the embedded store.
/// Such tests carry `#[ignore = "needs PostgreSQL and Redis"]`; scripts/test.sh runs them in its
/// PostgreSQL pass with `--include-ignored`.
pub fn postgres_env() -> TestEnv {
    let env = test_env();
    assert!(env.is_postgres(), "this test needs TMWS_TEST_DATABASE_URL and TMWS_TEST_REDIS_URL (scripts/test.sh)");
    env
}

/// Runs `sql` (portable between PostgreSQL and SQLite) straight on the database at `url` and
/// returns its single integer column.
pub async fn query_i64s(url: &str, sql: &str) -> Vec<i64> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open the SQLite file");
        sqlx::query_scalar(sql).fetch_all(&mut conn).await.expect(sql)
    } else {
        let mut conn = PgConnection::connect(url).await.expect("connect to the test database");
        sqlx::query_scalar(sql).fetch_all(&mut conn).await.expect(sql)
    }
}

/// Runs `statements` (portable between PostgreSQL and SQLite, or chosen by the caller for the
/// backend) straight on the database at `url`, on one connection.
pub async fn execute_sql(url: &str, statements: &[&str]) {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open the SQLite file");
        for sql in statements {
            conn.execute(*sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    } else {
        let mut conn = PgConnection::connect(url).await.expect("connect to the test database");
        for sql in statements {
            conn.execute(*sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}

/// `SELECT count(*) FROM <table>` straight on the database.
pub async fn count_rows(url: &str, table: &str) -> i64 {
    query_i64s(url, &format!("SELECT count(*) FROM {table}")).await.first().copied().unwrap_or_default()
}

/// A JSON column of one row by id, straight from the database (`jsonb` on PostgreSQL, TEXT on SQLite).
pub async fn json_column(url: &str, table: &str, column: &str, id: uuid::Uuid) -> serde_json::Value {
    let text: String = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open the SQLite file");
        sqlx::query_scalar(&format!("SELECT {column} FROM {table} WHERE id = ?1"))
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .expect("json column")
    } else {
        let mut conn = PgConnection::connect(url).await.expect("connect to the test database");
        sqlx::query_scalar(&format!("SELECT {column}::text FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .expect("json column")
    };
    serde_json::from_str(&text).expect("stored JSON")
}

/// A fresh directory under the system temp dir (left for the OS to clean; tests are short).
pub fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tmws-test-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// Replaces the database name (the path) of a postgres URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..].find('/').map(|i| scheme_end + i).unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..host_end], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Replaces host:port of a URL (to route it through a [`TcpProxy`]).
pub fn with_host_port(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!("{}{}{}{}", &url[..scheme_end], userinfo, addr, &rest[authority_end..])
}

/// A direct connection to a PostgreSQL test database.
pub async fn pg_connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect to the test database")
}

/// Runs `statements` on one connection to the PostgreSQL database at `url` with triggers off
/// (`session_replication_role = replica`): changes nobody is told about.
pub async fn execute_unannounced(url: &str, statements: &[&str]) {
    let mut conn = pg_connect(url).await;
    conn.execute("SET session_replication_role = replica").await.expect("replica role");
    for sql in statements {
        conn.execute(*sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Disables `(table, trigger)` pairs of the database at `url` for every session.
pub async fn disable_triggers(url: &str, triggers: &[(&str, &str)]) {
    let mut conn = pg_connect(url).await;
    for (table, trigger) in triggers {
        conn.execute(format!("ALTER TABLE {table} DISABLE TRIGGER {trigger}").as_str()).await.expect("disable trigger");
    }
}

/// Terminates the LISTEN connection of every server on the database at `url` (what a network
/// fault or a database restart does to it); returns how many were terminated.
pub async fn terminate_listeners(url: &str) -> usize {
    let mut conn = pg_connect(url).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%LISTEN%'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("terminate listeners");
    killed.into_iter().filter(|k| *k).count()
}

/// A fresh, empty database for one test, as a TMWS_DATABASE_URL. On SQLite: a new file in a new
/// temp dir. On PostgreSQL: a database `tmws_test_<unix secs>_<random>`; test databases older
/// than two hours (left by earlier runs) are dropped along the way.
pub async fn fresh_database(env: &TestEnv) -> String {
    if env.backend == TestBackend::Sqlite {
        return format!("sqlite://{}", temp_dir().join("tmws.db").display());
    }
    let mut admin = PgConnection::connect(&env.admin_database_url).await.expect("connect to TMWS_TEST_DATABASE_URL");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let stale: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tmws\\_test\\_%'")
        .fetch_all(&mut admin)
        .await
        .expect("list test databases");
    for name in stale {
        let created: u64 = name.split('_').nth(2).and_then(|s| s.parse().ok()).unwrap_or(now);
        if now.saturating_sub(created) > 7200 {
            let _ = admin.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str()).await;
        }
    }
    let name = format!("tmws_test_{}_{}", now, uuid::Uuid::now_v7().simple());
    admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.expect("create test database");
    admin.close().await.ok();
    with_database(&env.admin_database_url, &name)
}

/// The settings every test server starts from; `overrides` replace or add variables.
pub fn test_config(database_url: &str, redis_url: Option<&str>, overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("TMWS_ENVIRONMENT".into(), "development".into()),
        ("TMWS_GRPC_ADDR".into(), "127.0.0.1:0".into()),
        ("TMWS_DATABASE_URL".into(), database_url.into()),
        ("TMWS_DB_MAX_CONNECTIONS".into(), "5".into()),
        ("TMWS_DB_ACQUIRE_TIMEOUT".into(), "2s".into()),
        ("TMWS_DB_STARTUP_TIMEOUT".into(), "10s".into()),
        ("TMWS_HEALTH_CHECK_INTERVAL".into(), "200ms".into()),
        ("TMWS_HEALTH_CHECK_TIMEOUT".into(), "1s".into()),
        ("TMWS_SHUTDOWN_GRACE".into(), "5s".into()),
    ]);
    if let Some(url) = redis_url {
        vars.insert("TMWS_REDIS_URL".into(), url.into());
    }
    for (k, v) in overrides {
        vars.insert((*k).into(), (*v).into());
    }
    Config::from_lookup(|k| vars.get(k).cloned()).expect("valid test configuration")
}

/// Adds `authorization: Bearer <credential>` to calls that carry no credential of their own.
#[derive(Clone, Default)]
pub struct DefaultCredential(Option<MetadataValue<Ascii>>);

impl DefaultCredential {
    pub fn bearer(token: &str) -> Self {
        Self(Some(format!("Bearer {token}").parse().expect("ascii credential")))
    }
}

impl Interceptor for DefaultCredential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0
            && !req.metadata().contains_key("authorization")
        {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The channel the service clients use: the default credential of the test server attached.
pub type AuthChannel = InterceptedService<Channel, DefaultCredential>;

pub struct TestApp {
    pub addr: SocketAddr,
    pub database_url: String,
    pub channel: Channel,
    server: Option<RunningServer>,
    /// The bootstrap admin's API key (servers from [`spawn_app_auth`]); empty otherwise.
    pub admin_key: String,
    /// Attached to memory and workflow calls that carry no credential (the roster's `dev-agent`
    /// on [`spawn_app_env`] servers).
    pub default_credential: DefaultCredential,
}

impl TestApp {
    pub fn authed(&self) -> AuthChannel {
        InterceptedService::new(self.channel.clone(), self.default_credential.clone())
    }
    pub fn memory(&self) -> MemoryServiceClient<AuthChannel> {
        MemoryServiceClient::new(self.authed())
    }
    pub fn workflow(&self) -> WorkflowServiceClient<AuthChannel> {
        WorkflowServiceClient::new(self.authed())
    }
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
    pub fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel.clone())
    }

    /// `message` as a call by the bootstrap admin ([`spawn_app_auth`] servers).
    pub fn admin<T>(&self, message: T) -> tonic::Request<T> {
        with_key(message, &self.admin_key)
    }

    /// Creates an agent through the AgentService (as the bootstrap admin) and returns a new API
    /// key for it. `role`: admin, agent or readonly.
    pub async fn create_agent(&self, id: &str, namespace: &str, role: &str) -> String {
        let role = match role {
            "admin" => pb::Role::Admin,
            "agent" => pb::Role::Agent,
            "readonly" => pb::Role::Readonly,
            other => panic!("unknown role {other}"),
        };
        let agent = pb::Agent { id: id.into(), namespace: namespace.into(), role: role as i32, ..Default::default() };
        self.agents()
            .create_agent(self.admin(pb::CreateAgentRequest { agent: Some(agent), request_id: String::new() }))
            .await
            .unwrap_or_else(|s| panic!("create agent {id}: {s:?}"));
        self.create_key(id, &[]).await
    }

    /// A new API key for an existing agent (as the bootstrap admin), with `scopes` (empty: all
    /// its role allows).
    pub async fn create_key(&self, agent_id: &str, scopes: &[&str]) -> String {
        self.agents()
            .create_api_key(self.admin(pb::CreateApiKeyRequest {
                agent_id: agent_id.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|s| panic!("create key for {agent_id}: {s:?}"))
            .into_inner()
            .key
    }

    /// The status `Health/Check` reports for `service`.
    pub async fn health_status(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let resp = self.health().check(HealthCheckRequest { service: service.into() }).await?;
        Ok(resp.into_inner().status())
    }

    /// Polls `Health/Check` until `service` reports `want`; panics after `within`.
    pub async fn wait_for_status(&self, service: &str, want: ServingStatus, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.health_status(service).await;
            if matches!(&got, Ok(s) if *s == want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service}: wanted {want:?} within {within:?}, last saw {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Graceful shutdown; returns the server's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.server.take() {
            Some(s) => s.stop().await,
            None => Ok(()),
        }
    }
}

/// A server on a fresh database, with Redis configured.
pub async fn spawn_app() -> TestApp {
    let env = test_env();
    let db = fresh_database(&env).await;
    spawn_app_with(test_config(&db, env.redis(), &[])).await
}

/// The agents the memory and workflow suites act as: (id, namespace, role). Every
/// [`spawn_app_env`] server has them; [`as_agent`] signs in as one of them.
pub const ROSTER: &[(&str, &str, &str)] = &[
    ("dev-agent", "default", "agent"),
    ("alice", "red", "agent"),
    ("bob", "red", "agent"),
    ("carol", "blue", "agent"),
    ("root", "red", "admin"),
    ("rita", "red", "readonly"),
];

/// Settings of a [`spawn_app_env`] server: authentication on (API keys and HS256 JWTs signed
/// with [`TEST_SECRET_KEY`]), rate limits off unless `overrides` turn them on.
pub fn secure_config(
    database_url: &str,
    redis_url: Option<&str>,
    admin_key: &str,
    overrides: &[(&str, &str)],
) -> Config {
    let mut vars: Vec<(&str, &str)> = vec![("TMWS_JWT_HS256", "true"), ("TMWS_RATE_LIMIT_ENABLED", "false")];
    vars.extend_from_slice(overrides);
    auth_config(database_url, redis_url, admin_key, &vars)
}

/// A server with authentication on, on a fresh database with Redis, started with extra
/// settings; the [`ROSTER`] agents exist and un-credentialed calls run as `dev-agent`.
pub async fn spawn_app_env(overrides: &[(&str, &str)]) -> TestApp {
    let env = test_env();
    let db = fresh_database(&env).await;
    spawn_secure(&db, overrides).await
}

/// Like [`spawn_app_env`] on a given database (several replicas, restarts); the roster is
/// created when missing.
pub async fn spawn_secure(db: &str, overrides: &[(&str, &str)]) -> TestApp {
    let env = test_env();
    let key = random_api_key();
    let mut app = spawn_app_with(secure_config(db, env.redis(), &key, overrides)).await;
    app.admin_key = key;
    for (id, namespace, role) in ROSTER {
        let role = match *role {
            "admin" => pb::Role::Admin,
            "readonly" => pb::Role::Readonly,
            _ => pb::Role::Agent,
        };
        let agent =
            pb::Agent { id: (*id).into(), namespace: (*namespace).into(), role: role as i32, ..Default::default() };
        let created = app
            .agents()
            .create_agent(app.admin(pb::CreateAgentRequest { agent: Some(agent), request_id: String::new() }))
            .await;
        if let Err(s) = created
            && s.code() != tonic::Code::AlreadyExists
        {
            panic!("create roster agent {id}: {s:?}");
        }
    }
    app.default_credential = DefaultCredential::bearer(&jwt_for("dev-agent"));
    app
}

/// An HS256 JWT for `agent` signed with [`TEST_SECRET_KEY`], valid for an hour.
pub fn jwt_for(agent: &str) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    use hmac::{Hmac, Mac};
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(serde_json::json!({"sub": agent, "iat": now, "exp": now + 3600}).to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(TEST_SECRET_KEY.as_bytes()).expect("hmac key");
    mac.update(format!("{header}.{claims}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{claims}.{sig}")
}

/// `message` as a call by the [`ROSTER`] agent `agent` (signed in with a JWT). `namespace` and
/// `role` must be the roster's: they document the caller at the call site.
pub fn as_agent<T>(message: T, agent: &str, namespace: &str, role: &str) -> tonic::Request<T> {
    assert!(ROSTER.contains(&(agent, namespace, role)), "({agent}, {namespace}, {role}) is not in the test roster");
    with_key(message, &jwt_for(agent))
}

/// The server secret of authenticated test servers (random-looking, not a placeholder).
pub const TEST_SECRET_KEY: &str = "t3st-7c0f3d9a2b41e8f6a5d2c9b0e1f4a7d3-5e8b";

/// A fresh random API key string `tmws_<key id>_<secret>`.
pub fn random_api_key() -> String {
    tmws::auth::keys::generate().expect("random key").full
}

/// Settings of an authenticated test server: auth on, `admin_key` as TMWS_BOOTSTRAP_ADMIN_KEY
/// (agent `admin` in namespace `default`), and a Redis key prefix of its own so parallel tests
/// never share rate-limit state; `overrides` replace or add variables.
pub fn auth_config(database_url: &str, redis_url: Option<&str>, admin_key: &str, overrides: &[(&str, &str)]) -> Config {
    let prefix = format!("tmws-test:{}:", uuid::Uuid::now_v7().simple());
    let mut vars: Vec<(&str, &str)> = vec![
        ("TMWS_AUTH_ENABLED", "true"),
        ("TMWS_SECRET_KEY", TEST_SECRET_KEY),
        ("TMWS_BOOTSTRAP_ADMIN_KEY", admin_key),
        ("TMWS_REDIS_PREFIX", &prefix),
    ];
    vars.extend_from_slice(overrides);
    test_config(database_url, redis_url, &vars)
}

/// A server with authentication on, on a fresh database with Redis; [`TestApp::admin_key`] is
/// the key of its bootstrap admin (`admin`, namespace `default`).
pub async fn spawn_app_auth(overrides: &[(&str, &str)]) -> TestApp {
    let env = test_env();
    let db = fresh_database(&env).await;
    let key = random_api_key();
    let mut app = spawn_app_with(auth_config(&db, env.redis(), &key, overrides)).await;
    app.admin_key = key;
    app
}

/// `message` with `authorization: Bearer <key>` metadata (an API key or a JWT).
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ascii credential"));
    req
}

/// A server started from `config`; waits until it answers health checks.
pub async fn spawn_app_with(config: Config) -> TestApp {
    let database_url = config.database_url.clone();
    let server = RunningServer::start(config).await.expect("start server");
    let addr = server.addr;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let app = TestApp {
        addr,
        database_url,
        channel,
        server: Some(server),
        admin_key: String::new(),
        default_credential: DefaultCredential::default(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if app.health_status("").await.is_ok() {
            return app;
        }
        if app.server.as_ref().is_some_and(|s| s.is_finished()) {
            let err = app.stop().await.err();
            panic!("server exited during start-up: {err:?}");
        }
        assert!(tokio::time::Instant::now() < deadline, "server did not answer within 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy on loopback that a test can cut (closing every connection and refusing new
/// ones) and restore: a dependency outage without touching the shared service.
pub struct TcpProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (open2, conns2) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                conns2.lock().await.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, open, conns, accept }
    }

    /// Closes every proxied connection and refuses new ones.
    pub async fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.conns.lock().await.abort_all();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// host:port of a URL, resolved to a socket address.
pub fn socket_addr_of(url: &str) -> SocketAddr {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if url.starts_with("redis") { 6379 } else { 5432 };
    let hostport = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:{default_port}") };
    use std::net::ToSocketAddrs;
    hostport.to_socket_addrs().ok().and_then(|mut a| a.next()).unwrap_or_else(|| panic!("cannot resolve {hostport}"))
}
