//! Every `TMWS_*` setting, parsed and validated once at start-up.
//!
//! [`SETTINGS`] is the single table of variables: `tmws --help` prints it and the README's
//! configuration table mirrors it. An invalid value fails start-up with one line naming the
//! variable ([`ConfigError`]).

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

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
        default: "postgres://postgres@127.0.0.1:5432/tmws (development only)",
        help: "PostgreSQL URL (pgvector required); required outside development",
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
        help: "Maximum PostgreSQL connections per replica (1..=1000)",
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

pub const DEV_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tmws";

impl Config {
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

        let database_url = match get("TMWS_DATABASE_URL") {
            Some(url) => url,
            None if is_dev => DEV_DATABASE_URL.to_string(),
            None => return Err(err("TMWS_DATABASE_URL", "required outside development")),
        };
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(err("TMWS_DATABASE_URL", "expected a postgres:// or postgresql:// URL"));
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

        let config = Config {
            grpc_addr,
            database_url,
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
            // Authentication (API keys, JWT) is provided by the AgentService; until it is part
            // of this build, refusing to start is the only honest answer to "auth on".
            return Err(err(
                "TMWS_AUTH_ENABLED",
                "authentication is not available in this build; run with TMWS_ENVIRONMENT=development and TMWS_AUTH_ENABLED=false",
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

fn err(variable: &'static str, message: impl Into<String>) -> ConfigError {
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

fn parse_bool<G>(get: &G, name: &'static str, default: bool) -> Result<bool, ConfigError>
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

fn parse_duration<G>(get: &G, name: &'static str, default: Duration) -> Result<Duration, ConfigError>
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
        assert_eq!(c.database_url, DEV_DATABASE_URL);
        assert_eq!(c.log_format, LogFormat::Pretty);
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
