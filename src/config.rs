//! Every `TMWS_*` setting, parsed and validated once at start-up.
//!
//! [`SETTINGS`] is the single table of variables: `tmws --help` prints it and the README's
//! configuration table mirrors it. An invalid value fails start-up with one line naming the
//! variable ([`ConfigError`]).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

/// One documented setting: name, default, description.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable TMWS reads (besides `RUST_LOG` and the standard `OTEL_*`).
pub const SETTINGS: &[Setting] = &[
    Setting { name: "TMWS_GRPC_ADDR", default: "127.0.0.1:50051", help: "Address the gRPC server listens on" },
    Setting {
        name: "TMWS_DATABASE_URL",
        default: "(unset: embedded SQLite file in TMWS_DATA_DIR; development only)",
        help: "postgres://... (PostgreSQL with pgvector; for replicas) or sqlite:PATH (embedded, one process); required outside development",
    },
    Setting {
        name: "TMWS_DATA_DIR",
        default: "./data",
        help: "Directory of the embedded SQLite store (tmws.db) when TMWS_DATABASE_URL is unset; created if missing",
    },
    Setting {
        name: "TMWS_REDIS_URL",
        default: "(unset)",
        help: "Redis URL for shared rate-limit and cache state; unset disables Redis",
    },
    Setting {
        name: "TMWS_REDIS_REQUIRED",
        default: "false",
        help: "When true, the services report NOT_SERVING while Redis is unreachable",
    },
    Setting {
        name: "TMWS_ENVIRONMENT",
        default: "development",
        help: "development | staging | production (production refuses unsafe settings)",
    },
    Setting {
        name: "TMWS_AUTH_ENABLED",
        default: "false in development, true otherwise",
        help: "Require authentication on every public service",
    },
    Setting {
        name: "TMWS_SECRET_KEY",
        default: "(unset)",
        help: "Server secret (>= 32 bytes); required when auth is enabled",
    },
    Setting {
        name: "TMWS_DB_MAX_CONNECTIONS",
        default: "10",
        help: "Maximum PostgreSQL connections per replica (1..=1000); on the embedded store, read connections (writes use one)",
    },
    Setting {
        name: "TMWS_DB_ACQUIRE_TIMEOUT",
        default: "5s",
        help: "How long a request waits for a database connection before UNAVAILABLE",
    },
    Setting {
        name: "TMWS_DB_STARTUP_TIMEOUT",
        default: "30s",
        help: "How long start-up waits for PostgreSQL to become reachable",
    },
    Setting { name: "TMWS_AUTO_MIGRATE", default: "true", help: "Apply database migrations when `tmws serve` starts" },
    Setting {
        name: "TMWS_HEALTH_CHECK_INTERVAL",
        default: "2s",
        help: "How often the health watcher probes PostgreSQL and Redis",
    },
    Setting {
        name: "TMWS_HEALTH_CHECK_TIMEOUT",
        default: "2s",
        help: "A dependency probe slower than this counts as a failure",
    },
    Setting {
        name: "TMWS_SHUTDOWN_GRACE",
        default: "25s",
        help: "On SIGTERM/SIGINT, how long in-flight calls may drain before exit",
    },
    Setting {
        name: "TMWS_MAX_MESSAGE_BYTES",
        default: "4194304",
        help: "Largest gRPC message accepted or sent, in bytes",
    },
    Setting { name: "TMWS_LOG_FORMAT", default: "pretty in development, json otherwise", help: "json | pretty" },
    Setting {
        name: "TMWS_DEV_AGENT_ID",
        default: "dev-agent",
        help: "Development only (auth off): the agent id calls run as",
    },
    Setting {
        name: "TMWS_DEV_NAMESPACE",
        default: "default",
        help: "Development only (auth off): the namespace calls run in",
    },
    Setting {
        name: "TMWS_DEV_TRUST_HEADERS",
        default: "false",
        help: "Development only: take the principal from x-tmws-agent-id, x-tmws-namespace and x-tmws-role metadata (local multi-agent testing); refused outside development",
    },
    Setting {
        name: "TMWS_EMBEDDING_PROVIDER",
        default: "hash",
        help: "hash (built-in lexical embedder) | openai (any /v1/embeddings endpoint) | ollama (native /api/embed) | none (clients send vectors)",
    },
    Setting {
        name: "TMWS_EMBEDDING_URL",
        default: "(unset)",
        help: "Base URL of the embedding server for openai and ollama, e.g. http://127.0.0.1:11434",
    },
    Setting {
        name: "TMWS_EMBEDDING_MODEL",
        default: "tmws-hash-v1 (hash), client (none)",
        help: "Model name sent to the provider and recorded on every memory; required for openai and ollama",
    },
    Setting { name: "TMWS_EMBEDDING_API_KEY", default: "(unset)", help: "Bearer token for the embedding server" },
    Setting {
        name: "TMWS_EMBEDDING_DIMENSION",
        default: "384 for hash and none",
        help: "Vector dimension of the model; required for openai and ollama",
    },
    Setting { name: "TMWS_EMBEDDING_TIMEOUT", default: "10s", help: "Timeout of one embedding request" },
    Setting {
        name: "TMWS_EMBEDDING_MAX_RETRIES",
        default: "2",
        help: "Retries of a failed embedding request, with backoff, before UNAVAILABLE (0..=10)",
    },
    Setting {
        name: "TMWS_EMBEDDING_BATCH_SIZE",
        default: "64",
        help: "Texts per embedding request when embedding a batch (1..=2048)",
    },
    Setting { name: "TMWS_MAX_CONTENT_BYTES", default: "65536", help: "Largest memory content, in bytes" },
    Setting { name: "TMWS_MAX_TAGS", default: "64", help: "Most tags on one memory" },
    Setting { name: "TMWS_MAX_TAG_BYTES", default: "128", help: "Longest tag, in bytes" },
    Setting { name: "TMWS_MAX_METADATA_BYTES", default: "16384", help: "Largest memory metadata, as JSON bytes" },
    Setting { name: "TMWS_MAX_METADATA_DEPTH", default: "10", help: "Deepest nesting of memory metadata" },
    Setting { name: "TMWS_MAX_BATCH_SIZE", default: "100", help: "Most memories in one BatchCreateMemories call" },
    Setting { name: "TMWS_DEFAULT_PAGE_SIZE", default: "50", help: "page_size used when a List request leaves it 0" },
    Setting {
        name: "TMWS_MAX_PAGE_SIZE",
        default: "500",
        help: "Largest page; bigger page_size values are coerced to it",
    },
    Setting { name: "TMWS_MAX_TOP_K", default: "100", help: "Largest search top_k; bigger values are coerced to it" },
    Setting { name: "TMWS_MAX_TTL", default: "87600h", help: "Longest memory ttl, and furthest expire_time from now" },
    Setting { name: "TMWS_PRUNE_MAX_PER_CALL", default: "10000", help: "Most memories one PruneMemories call deletes" },
    Setting {
        name: "TMWS_SWEEP_INTERVAL",
        default: "60s",
        help: "How often expired memories are deleted (they are invisible at once regardless)",
    },
    Setting { name: "TMWS_SWEEP_BATCH", default: "1000", help: "Expired memories deleted per sweeper statement" },
    Setting {
        name: "TMWS_HNSW_M",
        default: "16",
        help: "HNSW parameter m, used when the server creates the index for a dimension",
    },
    Setting { name: "TMWS_HNSW_EF_CONSTRUCTION", default: "64", help: "HNSW parameter ef_construction" },
    Setting {
        name: "TMWS_HNSW_EF_SEARCH",
        default: "40",
        help: "hnsw.ef_search on every connection (recall against speed)",
    },
    Setting {
        name: "TMWS_EXACT_SEARCH_THRESHOLD",
        default: "10000",
        help: "Filtered searches matching fewer rows than this are answered exactly (prefilter, then sort by distance) instead of through HNSW",
    },
    Setting {
        name: "TMWS_EXACT_SEARCH_ESTIMATE_TTL",
        default: "10s",
        help: "How long a filtered search's plan choice (exact or HNSW) is reused for the same caller, namespace and filter before it is estimated again; 0 estimates every time",
    },
    Setting {
        name: "TMWS_MEMORY_CACHE_BYTES",
        default: "33554432",
        help: "Budget of the memory read cache of each replica, which GetMemory and searches use (PostgreSQL backend; estimated bytes, oldest entries go first); 0 turns it off",
    },
    Setting {
        name: "TMWS_MEMORY_CACHE_TTL",
        default: "1s",
        help: "Longest a cached memory is served without reading it again (changes are applied at once through LISTEN/NOTIFY; this bounds how late read counts are, and a lost notification); 0 turns the cache off",
    },
    Setting {
        name: "TMWS_TEXT_SEARCH_CONFIG",
        default: "english",
        help: "PostgreSQL text search configuration used for keyword search",
    },
    Setting { name: "TMWS_MAX_WORKFLOW_STEPS", default: "500", help: "Most steps in one workflow" },
    Setting { name: "TMWS_MAX_STEP_CONFIG_BYTES", default: "16384", help: "Largest step config, as JSON bytes" },
    Setting {
        name: "TMWS_MAX_PAYLOAD_BYTES",
        default: "262144",
        help: "Largest run input, task input and task output, as JSON bytes",
    },
    Setting {
        name: "TMWS_DEFAULT_MAX_ATTEMPTS",
        default: "3",
        help: "Attempts of a step or task without a retry policy",
    },
    Setting { name: "TMWS_MAX_ATTEMPTS", default: "100", help: "Largest max_attempts a retry policy may ask for" },
    Setting { name: "TMWS_DEFAULT_INITIAL_BACKOFF", default: "1s", help: "First retry backoff without a retry policy" },
    Setting { name: "TMWS_DEFAULT_MAX_BACKOFF", default: "60s", help: "Largest retry backoff without a retry policy" },
    Setting { name: "TMWS_MAX_BACKOFF", default: "1h", help: "Largest backoff a retry policy may ask for" },
    Setting { name: "TMWS_MAX_TIMEOUT", default: "7d", help: "Longest step timeout, run timeout and DELAY duration" },
    Setting { name: "TMWS_DEFAULT_LEASE", default: "30s", help: "Task lease when ClaimTasks gives none" },
    Setting { name: "TMWS_MAX_LEASE", default: "1h", help: "Longest task lease" },
    Setting { name: "TMWS_MAX_CLAIM_BATCH", default: "100", help: "Most tasks one ClaimTasks call may ask for" },
    Setting { name: "TMWS_MAX_CLAIM_WAIT", default: "30s", help: "Longest ClaimTasks long-poll" },
    Setting {
        name: "TMWS_ENGINE_TICK",
        default: "250ms",
        help: "How often each replica expires leases, fires timers and times out runs",
    },
    Setting {
        name: "TMWS_WATCH_BUFFER",
        default: "256",
        help: "Events buffered per WatchRun stream before the stream waits for its client",
    },
    Setting {
        name: "TMWS_METRICS_ADDR",
        default: "(unset: off)",
        help: "Address of the Prometheus endpoint (GET /metrics), e.g. 0.0.0.0:9464",
    },
    Setting {
        name: "TMWS_METRICS_SAMPLE_INTERVAL",
        default: "30s",
        help: "How often sampled gauges (memories per namespace, queue depths) are refreshed",
    },
    Setting {
        name: "TMWS_BOOTSTRAP_ADMIN_KEY",
        default: "(unset)",
        help: "A full API key (tmws_<key id>_<secret>, secret >= 32 random characters): at start, create or update an active admin holding it",
    },
    Setting { name: "TMWS_BOOTSTRAP_ADMIN_ID", default: "admin", help: "Agent id of the bootstrap admin" },
    Setting { name: "TMWS_BOOTSTRAP_ADMIN_NAMESPACE", default: "default", help: "Namespace of the bootstrap admin" },
    Setting {
        name: "TMWS_JWT_HS256",
        default: "false",
        help: "Also accept HS256 JWTs signed with TMWS_SECRET_KEY whose sub is an active agent",
    },
    Setting {
        name: "TMWS_JWT_PUBLIC_KEY_FILE",
        default: "(unset)",
        help: "Also accept RS256/ES256 JWTs verified with this PEM public key or JWKS file (keys chosen by kid)",
    },
    Setting { name: "TMWS_JWT_ISSUER", default: "(unset)", help: "Required JWT iss, when set" },
    Setting { name: "TMWS_JWT_AUDIENCE", default: "(unset)", help: "Required JWT aud, when set" },
    Setting { name: "TMWS_JWT_LEEWAY", default: "30s", help: "Clock skew allowed for JWT exp and nbf (at most 10m)" },
    Setting {
        name: "TMWS_TLS_CERT",
        default: "(unset)",
        help: "PEM certificate chain: serve gRPC over TLS (with TMWS_TLS_KEY)",
    },
    Setting { name: "TMWS_TLS_KEY", default: "(unset)", help: "PEM private key of TMWS_TLS_CERT" },
    Setting {
        name: "TMWS_TLS_CLIENT_CA",
        default: "(unset)",
        help: "PEM CA bundle: require client certificates signed by it (mTLS)",
    },
    Setting {
        name: "TMWS_TLS_TERMINATED_UPSTREAM",
        default: "false",
        help: "A mesh or proxy terminates TLS in front of this server (lets production run without TMWS_TLS_CERT)",
    },
    Setting {
        name: "TMWS_RATE_LIMIT_ENABLED",
        default: "true when auth is enabled, else false",
        help: "Limit calls per agent and method class (read, write, search, claim)",
    },
    Setting {
        name: "TMWS_RATE_LIMIT_FAIL_OPEN",
        default: "true",
        help: "When Redis is configured but unreachable: true allows calls (and logs), false answers UNAVAILABLE",
    },
    Setting {
        name: "TMWS_RATE_LIMIT_READ_PER_SEC",
        default: "100",
        help: "Get/List/Watch calls per second per agent (0: unlimited)",
    },
    Setting { name: "TMWS_RATE_LIMIT_READ_BURST", default: "200", help: "Read calls allowed at once" },
    Setting {
        name: "TMWS_RATE_LIMIT_WRITE_PER_SEC",
        default: "50",
        help: "Mutating calls per second per agent (0: unlimited)",
    },
    Setting { name: "TMWS_RATE_LIMIT_WRITE_BURST", default: "100", help: "Mutating calls allowed at once" },
    Setting {
        name: "TMWS_RATE_LIMIT_SEARCH_PER_SEC",
        default: "20",
        help: "Search calls per second per agent (0: unlimited)",
    },
    Setting { name: "TMWS_RATE_LIMIT_SEARCH_BURST", default: "40", help: "Search calls allowed at once" },
    Setting {
        name: "TMWS_RATE_LIMIT_CLAIM_PER_SEC",
        default: "100",
        help: "Claim/Heartbeat/Complete/Fail task calls per second per agent (0: unlimited)",
    },
    Setting { name: "TMWS_RATE_LIMIT_CLAIM_BURST", default: "200", help: "Task calls allowed at once" },
    Setting {
        name: "TMWS_REDIS_PREFIX",
        default: "tmws:",
        help: "Prefix of every Redis key the server writes (rate-limit state)",
    },
    Setting {
        name: "TMWS_REQUEST_TIMEOUT_MAX",
        default: "60s",
        help: "Deadline of a call (a shorter grpc-timeout wins; keep it above TMWS_MAX_CLAIM_WAIT); server-streaming calls are limited only until their first response",
    },
    Setting {
        name: "TMWS_MAX_CONCURRENT_REQUESTS",
        default: "1024",
        help: "Calls served at once per replica; more are refused at once with UNAVAILABLE",
    },
    Setting {
        name: "TMWS_AUDIT_RETENTION",
        default: "2160h",
        help: "Audit events older than this are deleted (0: keep forever)",
    },
    Setting { name: "TMWS_AUDIT_SWEEP_INTERVAL", default: "10m", help: "How often old audit events are deleted" },
    Setting {
        name: "TMWS_AUTH_CACHE_TTL",
        default: "1s",
        help: "Longest a found API key or JWT agent is reused without reading it again (PostgreSQL; revocations and agent changes apply at once through LISTEN/NOTIFY, this bounds what a lost notification can cost); 0 turns the cache off",
    },
    Setting {
        name: "TMWS_AUTH_CACHE_ENTRIES",
        default: "10000",
        help: "Most API keys, and apart most agents, each replica remembers; 0 turns the cache off",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Staging,
    Production,
}

impl FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "development" | "dev" => Ok(Self::Development),
            "staging" => Ok(Self::Staging),
            "production" | "prod" => Ok(Self::Production),
            _ => Err("expected development, staging or production".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" | "text" => Ok(Self::Pretty),
            _ => Err("expected json or pretty".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingProviderKind {
    /// Built-in deterministic lexical embedder (hashed word and character n-grams).
    Hash,
    /// Any OpenAI-compatible `POST {url}/v1/embeddings` endpoint.
    OpenAi,
    /// Ollama's native `POST {url}/api/embed`.
    Ollama,
    /// No server-side embedding: clients send vectors.
    None,
}

impl FromStr for EmbeddingProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "hash" => Ok(Self::Hash),
            "openai" => Ok(Self::OpenAi),
            "ollama" => Ok(Self::Ollama),
            "none" => Ok(Self::None),
            _ => Err("expected hash, openai, ollama or none".into()),
        }
    }
}

/// How memories get their vectors.
#[derive(Clone)]
pub struct EmbeddingConfig {
    pub provider: EmbeddingProviderKind,
    /// Base URL (openai, ollama), without a trailing slash.
    pub url: Option<String>,
    pub model: String,
    pub api_key: Option<String>,
    pub dimension: usize,
    pub timeout: Duration,
    pub max_retries: u32,
    pub batch_size: usize,
}

impl fmt::Debug for EmbeddingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddingConfig")
            .field("provider", &self.provider)
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("dimension", &self.dimension)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

/// Limits and tuning of the memory service.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    pub max_content_bytes: usize,
    pub max_tags: usize,
    pub max_tag_bytes: usize,
    pub max_metadata_bytes: usize,
    pub max_metadata_depth: usize,
    pub max_batch_size: usize,
    pub default_page_size: usize,
    pub max_page_size: usize,
    pub max_top_k: usize,
    pub max_ttl: Duration,
    pub prune_max_per_call: usize,
    pub sweep_interval: Duration,
    pub sweep_batch: usize,
    pub hnsw_m: u32,
    pub hnsw_ef_construction: u32,
    pub hnsw_ef_search: u32,
    pub exact_search_threshold: u64,
    pub exact_search_estimate_ttl: Duration,
    /// Budget of the memory read cache (GetMemory, search results); 0 = off.
    pub cache_bytes: usize,
    /// Lifetime of a cached memory; zero = off.
    pub cache_ttl: Duration,
    pub text_search_config: String,
}

/// Limits and timing of the workflow engine; durations in milliseconds.
#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    pub max_steps: usize,
    pub max_step_config_bytes: usize,
    pub max_payload_bytes: usize,
    pub default_max_attempts: i32,
    pub max_attempts: i32,
    pub default_initial_backoff_ms: i64,
    pub default_max_backoff_ms: i64,
    pub max_backoff_ms: i64,
    pub max_timeout_ms: i64,
    pub default_lease_ms: i64,
    pub max_lease_ms: i64,
    pub max_claim_batch: usize,
    pub max_claim_wait_ms: i64,
    pub engine_tick: Duration,
    pub watch_buffer: usize,
}

/// The principal calls run as when authentication is off (development only).
#[derive(Debug, Clone)]
pub struct DevPrincipalConfig {
    pub agent_id: String,
    pub namespace: String,
    /// Take the principal from `x-tmws-agent-id` / `x-tmws-namespace` / `x-tmws-role` metadata.
    pub trust_headers: bool,
}

/// A setting that could not be used; `Display` is one line naming the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.variable, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub database_url: String,
    /// Directory of the embedded store's default file.
    pub data_dir: PathBuf,
    pub redis_url: Option<String>,
    pub redis_required: bool,
    pub environment: Environment,
    pub auth_enabled: bool,
    pub secret_key: Option<String>,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_startup_timeout: Duration,
    pub auto_migrate: bool,
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_message_bytes: usize,
    pub log_format: LogFormat,
    pub dev: DevPrincipalConfig,
    pub embedding: EmbeddingConfig,
    pub memory: MemoryConfig,
    pub workflow: WorkflowConfig,
    /// Prometheus endpoint; `None` = off.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_sample_interval: Duration,
    /// JWT, TLS, bootstrap admin, rate limits, request guards and audit.
    pub security: crate::auth::config::SecurityConfig,
}

impl fmt::Debug for Config {
    // Secrets and credentials inside URLs never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_required", &self.redis_required)
            .field("environment", &self.environment)
            .field("auth_enabled", &self.auth_enabled)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("db_max_connections", &self.db_max_connections)
            .field("db_acquire_timeout", &self.db_acquire_timeout)
            .field("db_startup_timeout", &self.db_startup_timeout)
            .field("auto_migrate", &self.auto_migrate)
            .field("health_check_interval", &self.health_check_interval)
            .field("health_check_timeout", &self.health_check_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("log_format", &self.log_format)
            .field("dev", &self.dev)
            .field("embedding", &self.embedding)
            .field("memory", &self.memory)
            .field("workflow", &self.workflow)
            .field("metrics_addr", &self.metrics_addr)
            .field("metrics_sample_interval", &self.metrics_sample_interval)
            .field("security", &self.security)
            .finish()
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

/// Which backend a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// PostgreSQL with pgvector: the production path (replicas share it).
    Postgres,
    /// The embedded SQLite file: zero setup, one process owns it.
    Sqlite,
}

impl DatabaseKind {
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

impl Config {
    /// The backend `database_url` selects (validated when the configuration was read).
    pub fn database_kind(&self) -> DatabaseKind {
        DatabaseKind::of(&self.database_url).unwrap_or(DatabaseKind::Postgres)
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup<F>(lookup: F) -> Result<Self, ConfigError>
    where
        F: Fn(&str) -> Option<String>,
    {
        let get = |name: &'static str| -> Option<String> {
            lookup(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
        };
        let environment: Environment = parse(&get, "TMWS_ENVIRONMENT", Environment::Development)?;
        let is_dev = environment == Environment::Development;

        let grpc_addr = parse(&get, "TMWS_GRPC_ADDR", SocketAddr::from(([127, 0, 0, 1], 50051)))?;

        let data_dir = PathBuf::from(get("TMWS_DATA_DIR").unwrap_or_else(|| "./data".to_string()));
        let database_url = match get("TMWS_DATABASE_URL") {
            Some(url) => url,
            None if is_dev => format!("sqlite://{}", data_dir.join("tmws.db").display()),
            None => {
                return Err(err(
                    "TMWS_DATABASE_URL",
                    "required outside development (postgres://... or sqlite:PATH for the embedded store)",
                ));
            }
        };
        if DatabaseKind::of(&database_url).is_none() {
            return Err(err("TMWS_DATABASE_URL", "expected a postgres://, postgresql:// or sqlite: URL"));
        }
        if DatabaseKind::of(&database_url) == Some(DatabaseKind::Sqlite) && database_url.contains(":memory:") {
            return Err(err("TMWS_DATABASE_URL", "an in-memory SQLite database keeps nothing; give a file path"));
        }

        let redis_url = get("TMWS_REDIS_URL");
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(err("TMWS_REDIS_URL", "expected a redis:// or rediss:// URL"));
        }
        let redis_required = parse_bool(&get, "TMWS_REDIS_REQUIRED", false)?;
        if redis_required && redis_url.is_none() {
            return Err(err("TMWS_REDIS_REQUIRED", "is true but TMWS_REDIS_URL is not set"));
        }

        let auth_enabled = parse_bool(&get, "TMWS_AUTH_ENABLED", !is_dev)?;
        let secret_key = get("TMWS_SECRET_KEY");

        let db_max_connections: u32 = parse(&get, "TMWS_DB_MAX_CONNECTIONS", 10)?;
        if !(1..=1000).contains(&db_max_connections) {
            return Err(err("TMWS_DB_MAX_CONNECTIONS", "must be between 1 and 1000"));
        }
        let db_acquire_timeout = parse_duration(&get, "TMWS_DB_ACQUIRE_TIMEOUT", secs(5))?;
        let db_startup_timeout = parse_duration(&get, "TMWS_DB_STARTUP_TIMEOUT", secs(30))?;
        let auto_migrate = parse_bool(&get, "TMWS_AUTO_MIGRATE", true)?;
        let health_check_interval = parse_duration(&get, "TMWS_HEALTH_CHECK_INTERVAL", secs(2))?;
        let health_check_timeout = parse_duration(&get, "TMWS_HEALTH_CHECK_TIMEOUT", secs(2))?;
        let shutdown_grace = parse_duration(&get, "TMWS_SHUTDOWN_GRACE", secs(25))?;
        for (name, value) in [
            ("TMWS_DB_ACQUIRE_TIMEOUT", db_acquire_timeout),
            ("TMWS_HEALTH_CHECK_INTERVAL", health_check_interval),
            ("TMWS_HEALTH_CHECK_TIMEOUT", health_check_timeout),
        ] {
            if value.is_zero() {
                return Err(err(name, "must be greater than zero"));
            }
        }
        let max_message_bytes: usize = parse(&get, "TMWS_MAX_MESSAGE_BYTES", 4 * 1024 * 1024)?;
        if !(1024..=256 * 1024 * 1024).contains(&max_message_bytes) {
            return Err(err("TMWS_MAX_MESSAGE_BYTES", "must be between 1024 and 268435456"));
        }
        let default_format = if is_dev { LogFormat::Pretty } else { LogFormat::Json };
        let log_format = parse(&get, "TMWS_LOG_FORMAT", default_format)?;

        let dev = DevPrincipalConfig {
            agent_id: get("TMWS_DEV_AGENT_ID").unwrap_or_else(|| "dev-agent".into()),
            namespace: get("TMWS_DEV_NAMESPACE").unwrap_or_else(|| "default".into()),
            trust_headers: parse_bool(&get, "TMWS_DEV_TRUST_HEADERS", false)?,
        };
        if dev.trust_headers && !is_dev {
            return Err(err("TMWS_DEV_TRUST_HEADERS", "allowed only with TMWS_ENVIRONMENT=development"));
        }
        if !crate::config::is_valid_identifier(&dev.agent_id) {
            return Err(err("TMWS_DEV_AGENT_ID", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
        }
        if !crate::config::is_valid_identifier(&dev.namespace) {
            return Err(err("TMWS_DEV_NAMESPACE", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
        }

        let provider: EmbeddingProviderKind = parse(&get, "TMWS_EMBEDDING_PROVIDER", EmbeddingProviderKind::Hash)?;
        let needs_server = matches!(provider, EmbeddingProviderKind::OpenAi | EmbeddingProviderKind::Ollama);
        let url = get("TMWS_EMBEDDING_URL").map(|u| u.trim_end_matches('/').to_string());
        if needs_server {
            match &url {
                None => return Err(err("TMWS_EMBEDDING_URL", "required for the openai and ollama providers")),
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    return Err(err("TMWS_EMBEDDING_URL", "expected an http:// or https:// URL"));
                }
                Some(_) => {}
            }
        }
        let model = match (get("TMWS_EMBEDDING_MODEL"), provider) {
            (Some(m), _) => m,
            (None, EmbeddingProviderKind::Hash) => "tmws-hash-v1".into(),
            (None, EmbeddingProviderKind::None) => "client".into(),
            (None, _) => return Err(err("TMWS_EMBEDDING_MODEL", "required for the openai and ollama providers")),
        };
        let dimension: usize = match (get("TMWS_EMBEDDING_DIMENSION"), needs_server) {
            (None, true) => {
                return Err(err("TMWS_EMBEDDING_DIMENSION", "required for the openai and ollama providers"));
            }
            _ => parse(&get, "TMWS_EMBEDDING_DIMENSION", 384)?,
        };
        if !(1..=16000).contains(&dimension) {
            return Err(err("TMWS_EMBEDDING_DIMENSION", "must be between 1 and 16000"));
        }
        let embedding = EmbeddingConfig {
            provider,
            url,
            model,
            api_key: get("TMWS_EMBEDDING_API_KEY"),
            dimension,
            timeout: parse_duration(&get, "TMWS_EMBEDDING_TIMEOUT", secs(10))?,
            max_retries: parse_range(&get, "TMWS_EMBEDDING_MAX_RETRIES", 2, 0, 10)?,
            batch_size: parse_range(&get, "TMWS_EMBEDDING_BATCH_SIZE", 64, 1, 2048)?,
        };
        if embedding.timeout.is_zero() {
            return Err(err("TMWS_EMBEDDING_TIMEOUT", "must be greater than zero"));
        }

        let default_page_size = parse_range(&get, "TMWS_DEFAULT_PAGE_SIZE", 50, 1, 10_000)?;
        let max_page_size = parse_range(&get, "TMWS_MAX_PAGE_SIZE", 500, 1, 10_000)?;
        if default_page_size > max_page_size {
            return Err(err("TMWS_DEFAULT_PAGE_SIZE", "must not exceed TMWS_MAX_PAGE_SIZE"));
        }
        let text_search_config = get("TMWS_TEXT_SEARCH_CONFIG").unwrap_or_else(|| "english".into());
        if !text_search_config.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(
                "TMWS_TEXT_SEARCH_CONFIG",
                "must be a text search configuration name such as english or simple",
            ));
        }
        let memory = MemoryConfig {
            max_content_bytes: parse_range(&get, "TMWS_MAX_CONTENT_BYTES", 64 * 1024, 1, 64 * 1024 * 1024)?,
            max_tags: parse_range(&get, "TMWS_MAX_TAGS", 64, 0, 10_000)?,
            max_tag_bytes: parse_range(&get, "TMWS_MAX_TAG_BYTES", 128, 1, 4096)?,
            max_metadata_bytes: parse_range(&get, "TMWS_MAX_METADATA_BYTES", 16 * 1024, 2, 16 * 1024 * 1024)?,
            max_metadata_depth: parse_range(&get, "TMWS_MAX_METADATA_DEPTH", 10, 1, 100)?,
            max_batch_size: parse_range(&get, "TMWS_MAX_BATCH_SIZE", 100, 1, 10_000)?,
            default_page_size,
            max_page_size,
            max_top_k: parse_range(&get, "TMWS_MAX_TOP_K", 100, 1, 10_000)?,
            max_ttl: parse_duration(&get, "TMWS_MAX_TTL", secs(87_600 * 3600))?,
            prune_max_per_call: parse_range(&get, "TMWS_PRUNE_MAX_PER_CALL", 10_000, 1, 10_000_000)?,
            sweep_interval: parse_duration(&get, "TMWS_SWEEP_INTERVAL", secs(60))?,
            sweep_batch: parse_range(&get, "TMWS_SWEEP_BATCH", 1000, 1, 1_000_000)?,
            hnsw_m: parse_range(&get, "TMWS_HNSW_M", 16, 2, 100)?,
            hnsw_ef_construction: parse_range(&get, "TMWS_HNSW_EF_CONSTRUCTION", 64, 4, 1000)?,
            hnsw_ef_search: parse_range(&get, "TMWS_HNSW_EF_SEARCH", 40, 1, 1000)?,
            exact_search_threshold: parse_range(&get, "TMWS_EXACT_SEARCH_THRESHOLD", 10_000, 0, 100_000_000)?,
            exact_search_estimate_ttl: parse_duration(&get, "TMWS_EXACT_SEARCH_ESTIMATE_TTL", secs(10))?,
            cache_bytes: parse_range(&get, "TMWS_MEMORY_CACHE_BYTES", 32 * 1024 * 1024, 0, 64 * 1024 * 1024 * 1024)?,
            cache_ttl: parse_duration(&get, "TMWS_MEMORY_CACHE_TTL", secs(1))?,
            text_search_config,
        };
        if memory.sweep_interval.is_zero() {
            return Err(err("TMWS_SWEEP_INTERVAL", "must be greater than zero"));
        }

        let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
        let workflow = WorkflowConfig {
            max_steps: parse_range(&get, "TMWS_MAX_WORKFLOW_STEPS", 500, 1, 100_000)?,
            max_step_config_bytes: parse_range(&get, "TMWS_MAX_STEP_CONFIG_BYTES", 16 * 1024, 2, 16 * 1024 * 1024)?,
            max_payload_bytes: parse_range(&get, "TMWS_MAX_PAYLOAD_BYTES", 256 * 1024, 2, 64 * 1024 * 1024)?,
            default_max_attempts: parse_range(&get, "TMWS_DEFAULT_MAX_ATTEMPTS", 3, 1, 10_000)?,
            max_attempts: parse_range(&get, "TMWS_MAX_ATTEMPTS", 100, 1, 10_000)?,
            default_initial_backoff_ms: ms(parse_duration(&get, "TMWS_DEFAULT_INITIAL_BACKOFF", secs(1))?),
            default_max_backoff_ms: ms(parse_duration(&get, "TMWS_DEFAULT_MAX_BACKOFF", secs(60))?),
            max_backoff_ms: ms(parse_duration(&get, "TMWS_MAX_BACKOFF", secs(3600))?),
            max_timeout_ms: ms(parse_duration(&get, "TMWS_MAX_TIMEOUT", secs(7 * 86_400))?),
            default_lease_ms: ms(parse_duration(&get, "TMWS_DEFAULT_LEASE", secs(30))?),
            max_lease_ms: ms(parse_duration(&get, "TMWS_MAX_LEASE", secs(3600))?),
            max_claim_batch: parse_range(&get, "TMWS_MAX_CLAIM_BATCH", 100, 1, 10_000)?,
            max_claim_wait_ms: ms(parse_duration(&get, "TMWS_MAX_CLAIM_WAIT", secs(30))?),
            engine_tick: parse_duration(&get, "TMWS_ENGINE_TICK", Duration::from_millis(250))?,
            watch_buffer: parse_range(&get, "TMWS_WATCH_BUFFER", 256, 1, 1_000_000)?,
        };
        let metrics_addr = match get("TMWS_METRICS_ADDR") {
            None => None,
            Some(raw) => Some(
                raw.parse::<SocketAddr>()
                    .map_err(|e| err("TMWS_METRICS_ADDR", format!("invalid value {raw:?}: {e}")))?,
            ),
        };
        let metrics_sample_interval = parse_duration(&get, "TMWS_METRICS_SAMPLE_INTERVAL", secs(30))?;
        if metrics_sample_interval.is_zero() {
            return Err(err("TMWS_METRICS_SAMPLE_INTERVAL", "must be greater than zero"));
        }
        if workflow.default_max_attempts > workflow.max_attempts {
            return Err(err("TMWS_DEFAULT_MAX_ATTEMPTS", "must not exceed TMWS_MAX_ATTEMPTS"));
        }
        if workflow.engine_tick.is_zero() {
            return Err(err("TMWS_ENGINE_TICK", "must be greater than zero"));
        }
        if workflow.default_lease_ms < 1000 || workflow.default_lease_ms > workflow.max_lease_ms {
            return Err(err("TMWS_DEFAULT_LEASE", "must be at least 1s and at most TMWS_MAX_LEASE"));
        }

        let security = crate::auth::config::SecurityConfig::from_lookup(&get, auth_enabled)?;

        let config = Config {
            grpc_addr,
            database_url,
            data_dir,
            redis_url,
            redis_required,
            environment,
            auth_enabled,
            secret_key,
            db_max_connections,
            db_acquire_timeout,
            db_startup_timeout,
            auto_migrate,
            health_check_interval,
            health_check_timeout,
            shutdown_grace,
            max_message_bytes,
            log_format,
            dev,
            embedding,
            memory,
            workflow,
            metrics_addr,
            metrics_sample_interval,
            security,
        };
        config.validate()?;
        Ok(config)
    }

    /// Cross-setting rules: what staging and production refuse.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.environment != Environment::Development && !self.auth_enabled {
            return Err(err("TMWS_AUTH_ENABLED", "authentication may be off only with TMWS_ENVIRONMENT=development"));
        }
        if self.auth_enabled {
            match &self.secret_key {
                None => return Err(err("TMWS_SECRET_KEY", "required when authentication is enabled")),
                Some(key) if key.len() < 32 => {
                    return Err(err("TMWS_SECRET_KEY", "must be at least 32 bytes"));
                }
                Some(key) if is_weak_secret(key) => {
                    return Err(err("TMWS_SECRET_KEY", "is a known weak or placeholder value"));
                }
                Some(_) => {}
            }
            if self.dev.trust_headers {
                return Err(err(
                    "TMWS_DEV_TRUST_HEADERS",
                    "identity headers are never trusted with TMWS_AUTH_ENABLED=true",
                ));
            }
        }
        if self.environment == Environment::Production
            && !self.security.tls.enabled()
            && !self.security.tls.terminated_upstream
        {
            return Err(err(
                "TMWS_TLS_CERT",
                "production requires TLS: set TMWS_TLS_CERT and TMWS_TLS_KEY, or TMWS_TLS_TERMINATED_UPSTREAM=true when a mesh or proxy terminates TLS",
            ));
        }
        Ok(())
    }
}

/// Placeholder secrets that show up in copied examples; refused in every environment.
fn is_weak_secret(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    let distinct = {
        let mut bytes: Vec<u8> = key.bytes().collect();
        bytes.sort_unstable();
        bytes.dedup();
        bytes.len()
    };
    distinct < 8
        || ["changeme", "change-me", "change_me", "secret", "password", "example", "your-", "insecure", "default"]
            .iter()
            .any(|w| lower.contains(w))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(crate) fn err(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable, message: message.into() }
}

fn parse<T, G>(get: &G, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
    G: Fn(&'static str) -> Option<String>,
{
    match get(name) {
        None => Ok(default),
        Some(raw) => raw.parse::<T>().map_err(|e| err(name, format!("invalid value {raw:?}: {e}"))),
    }
}

/// Agent ids and namespaces: 1-128 characters of `[A-Za-z0-9._:@-]`.
pub fn is_valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._:@-".contains(c))
}

pub(crate) fn parse_range<T, G>(get: &G, name: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + fmt::Display + Copy,
    T::Err: fmt::Display,
    G: Fn(&'static str) -> Option<String>,
{
    let value = parse(get, name, default)?;
    if value < min || value > max {
        return Err(err(name, format!("must be between {min} and {max}")));
    }
    Ok(value)
}

pub(crate) fn parse_bool<G>(get: &G, name: &'static str, default: bool) -> Result<bool, ConfigError>
where
    G: Fn(&'static str) -> Option<String>,
{
    match get(name) {
        None => Ok(default),
        Some(raw) => match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(err(name, format!("invalid value {raw:?}: expected true or false"))),
        },
    }
}

pub(crate) fn parse_duration<G>(get: &G, name: &'static str, default: Duration) -> Result<Duration, ConfigError>
where
    G: Fn(&'static str) -> Option<String>,
{
    match get(name) {
        None => Ok(default),
        Some(raw) => parse_duration_str(&raw).map_err(|e| err(name, format!("invalid value {raw:?}: {e}"))),
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h`; a bare number means seconds.
pub fn parse_duration_str(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number.parse().map_err(|_| "expected a duration such as 500ms, 5s, 2m".to_string())?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err("out of range".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The `--help` text listing every variable.
pub fn settings_help() -> String {
    let mut out = String::from("Environment variables (plus RUST_LOG and the standard OTEL_*):\n");
    for s in SETTINGS {
        out.push_str(&format!("  {:<28} {} [default: {}]\n", s.name, s.help, s.default));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_development() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.environment, Environment::Development);
        assert!(!c.auth_enabled);
        assert_eq!(c.database_url, "sqlite://./data/tmws.db");
        assert_eq!(c.database_kind(), DatabaseKind::Sqlite);
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn database_url_selects_the_backend() {
        let c = cfg(&[("TMWS_DATA_DIR", "/var/lib/tmws")]).expect("valid");
        assert_eq!(c.database_url, "sqlite:///var/lib/tmws/tmws.db");
        let c = cfg(&[("TMWS_DATABASE_URL", "postgres://h/db")]).expect("valid");
        assert_eq!(c.database_kind(), DatabaseKind::Postgres);
        let c = cfg(&[("TMWS_DATABASE_URL", "sqlite:other.db")]).expect("valid");
        assert_eq!(c.database_kind(), DatabaseKind::Sqlite);
        let e = cfg(&[("TMWS_DATABASE_URL", "sqlite::memory:")]).expect_err("in-memory");
        assert_eq!(e.variable, "TMWS_DATABASE_URL");
        let e = cfg(&[("TMWS_ENVIRONMENT", "production")]).expect_err("production needs a URL");
        assert_eq!(e.variable, "TMWS_DATABASE_URL");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("TMWS_GRPC_ADDR", "nope"),
            ("TMWS_ENVIRONMENT", "moon"),
            ("TMWS_DB_MAX_CONNECTIONS", "0"),
            ("TMWS_DB_MAX_CONNECTIONS", "many"),
            ("TMWS_AUTO_MIGRATE", "maybe"),
            ("TMWS_LOG_FORMAT", "xml"),
            ("TMWS_SHUTDOWN_GRACE", "5 parsecs"),
            ("TMWS_DATABASE_URL", "mysql://x"),
            ("TMWS_REDIS_URL", "http://x"),
            ("TMWS_MAX_MESSAGE_BYTES", "1"),
            ("TMWS_MEMORY_CACHE_BYTES", "-1"),
            ("TMWS_MEMORY_CACHE_BYTES", "lots"),
            ("TMWS_MEMORY_CACHE_TTL", "soon"),
            ("TMWS_AUTH_CACHE_TTL", "-1s"),
            ("TMWS_AUTH_CACHE_ENTRIES", "100000000"),
        ] {
            let e = cfg(&[(name, value)]).expect_err(name);
            assert_eq!(e.variable, name, "{e}");
            assert!(e.to_string().contains(name));
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn production_refuses_auth_off_and_weak_secrets() {
        let e = cfg(&[
            ("TMWS_ENVIRONMENT", "production"),
            ("TMWS_DATABASE_URL", "postgres://h/db"),
            ("TMWS_AUTH_ENABLED", "false"),
        ])
        .expect_err("auth off");
        assert_eq!(e.variable, "TMWS_AUTH_ENABLED");
        let e = cfg(&[("TMWS_ENVIRONMENT", "production"), ("TMWS_DATABASE_URL", "postgres://h/db")])
            .expect_err("no secret");
        assert_eq!(e.variable, "TMWS_SECRET_KEY");
        let e = cfg(&[
            ("TMWS_ENVIRONMENT", "production"),
            ("TMWS_DATABASE_URL", "postgres://h/db"),
            ("TMWS_SECRET_KEY", "changeme-changeme-changeme-changeme"),
        ])
        .expect_err("weak secret");
        assert_eq!(e.variable, "TMWS_SECRET_KEY");
        let e = cfg(&[("TMWS_ENVIRONMENT", "production")]).expect_err("no database url");
        assert_eq!(e.variable, "TMWS_DATABASE_URL");
    }

    #[test]
    fn read_caches_default_on_and_turn_off_with_zero() {
        let c = cfg(&[]).expect("defaults");
        assert_eq!((c.memory.cache_bytes, c.memory.cache_ttl), (32 * 1024 * 1024, secs(1)));
        assert_eq!((c.security.auth_cache_entries, c.security.auth_cache_ttl), (10_000, secs(1)));
        let c = cfg(&[
            ("TMWS_MEMORY_CACHE_BYTES", "0"),
            ("TMWS_MEMORY_CACHE_TTL", "0"),
            ("TMWS_AUTH_CACHE_ENTRIES", "0"),
            ("TMWS_AUTH_CACHE_TTL", "0"),
        ])
        .expect("zero is off");
        assert_eq!((c.memory.cache_bytes, c.memory.cache_ttl), (0, Duration::ZERO));
        assert_eq!((c.security.auth_cache_entries, c.security.auth_cache_ttl), (0, Duration::ZERO));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_str("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration_str("5").unwrap(), secs(5));
        assert_eq!(parse_duration_str("2m").unwrap(), secs(120));
        assert!(parse_duration_str("-1s").is_err());
        assert!(parse_duration_str("1y").is_err());
    }

    #[test]
    fn debug_redacts_credentials() {
        let c = cfg(&[("TMWS_DATABASE_URL", "postgres://u:hunter2@db/x"), ("TMWS_REDIS_URL", "redis://:pw@r:6379")])
            .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains(":pw@"), "{s}");
    }
}
