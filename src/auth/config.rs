//! Security settings: JWT, TLS, bootstrap admin, rate limits, request guards and audit.
//! Parsed by [`crate::config::Config`] (which owns the table of every `TMWS_*` variable).

use std::{path::PathBuf, time::Duration};

use super::{jwt::JwtConfig, keys};
use crate::config::{ConfigError, err, parse_bool, parse_duration, parse_range};

/// One method class's limit: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Calls per second; 0 means unlimited.
    pub per_sec: f64,
    /// Calls allowed at once on top of an idle budget (at least 1).
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// When Redis is configured but unreachable: allow (true) or answer UNAVAILABLE (false).
    pub fail_open: bool,
    pub read: Rate,
    pub write: Rate,
    pub search: Rate,
    pub claim: Rate,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// A mesh or proxy in front terminates TLS (production then allows plaintext here).
    pub terminated_upstream: bool,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// `TMWS_BOOTSTRAP_ADMIN_*`: an admin created or updated at start from a given key.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapAdmin {
    pub key: String,
    pub agent_id: String,
    pub namespace: String,
}

impl std::fmt::Debug for BootstrapAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapAdmin")
            .field("key", &"<redacted>")
            .field("agent_id", &self.agent_id)
            .field("namespace", &self.namespace)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct SecurityConfig {
    pub jwt: JwtConfig,
    pub tls: TlsConfig,
    pub bootstrap_admin: Option<BootstrapAdmin>,
    pub rate_limit: RateLimitConfig,
    /// Prefix of every Redis key this server writes.
    pub redis_prefix: String,
    /// Upper bound of a call's deadline (a shorter `grpc-timeout` wins).
    pub request_timeout_max: Duration,
    /// Calls served at once; more are refused with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// Audit rows older than this are deleted; zero keeps them forever.
    pub audit_retention: Duration,
    pub audit_sweep_interval: Duration,
    /// Lifetime of a remembered credential; zero = no credential cache.
    pub auth_cache_ttl: Duration,
    /// Most API keys (and, apart, agents) remembered; 0 = no credential cache.
    pub auth_cache_entries: usize,
}

fn rate<G>(get: &G, per_sec: (&'static str, f64), burst: (&'static str, u32)) -> Result<Rate, ConfigError>
where
    G: Fn(&'static str) -> Option<String>,
{
    let per = match get(per_sec.0) {
        None => per_sec.1,
        Some(raw) => {
            raw.parse::<f64>().ok().filter(|v| v.is_finite() && (0.0..=1_000_000.0).contains(v)).ok_or_else(|| {
                err(per_sec.0, format!("invalid value {raw:?}: expected 0..=1000000 calls per second"))
            })?
        }
    };
    let b = parse_range(get, burst.0, burst.1, 1, 1_000_000)?;
    Ok(Rate { per_sec: per, burst: b })
}

impl SecurityConfig {
    pub(crate) fn from_lookup<G>(get: &G, auth_enabled: bool) -> Result<Self, ConfigError>
    where
        G: Fn(&'static str) -> Option<String>,
    {
        let jwt = JwtConfig {
            hs256: parse_bool(get, "TMWS_JWT_HS256", false)?,
            public_key_file: get("TMWS_JWT_PUBLIC_KEY_FILE").map(PathBuf::from),
            issuer: get("TMWS_JWT_ISSUER"),
            audience: get("TMWS_JWT_AUDIENCE"),
            leeway: parse_duration(get, "TMWS_JWT_LEEWAY", Duration::from_secs(30))?,
        };
        if jwt.leeway > Duration::from_secs(600) {
            return Err(err("TMWS_JWT_LEEWAY", "must be at most 10m"));
        }
        let tls = TlsConfig {
            cert: get("TMWS_TLS_CERT").map(PathBuf::from),
            key: get("TMWS_TLS_KEY").map(PathBuf::from),
            client_ca: get("TMWS_TLS_CLIENT_CA").map(PathBuf::from),
            terminated_upstream: parse_bool(get, "TMWS_TLS_TERMINATED_UPSTREAM", false)?,
        };
        match (&tls.cert, &tls.key) {
            (Some(_), None) => return Err(err("TMWS_TLS_KEY", "required with TMWS_TLS_CERT")),
            (None, Some(_)) => return Err(err("TMWS_TLS_CERT", "required with TMWS_TLS_KEY")),
            _ => {}
        }
        if tls.client_ca.is_some() && tls.cert.is_none() {
            return Err(err("TMWS_TLS_CLIENT_CA", "needs TMWS_TLS_CERT and TMWS_TLS_KEY (server TLS)"));
        }

        let bootstrap_admin = match get("TMWS_BOOTSTRAP_ADMIN_KEY") {
            None => None,
            Some(key) => {
                let parsed = keys::parse(&key).ok_or_else(|| {
                    err("TMWS_BOOTSTRAP_ADMIN_KEY", "expected tmws_<key id>_<secret> (key id: 8-64 of [a-z0-9])")
                })?;
                keys::check_external_secret(parsed.secret).map_err(|m| err("TMWS_BOOTSTRAP_ADMIN_KEY", m))?;
                let agent_id = get("TMWS_BOOTSTRAP_ADMIN_ID").unwrap_or_else(|| "admin".into());
                let namespace = get("TMWS_BOOTSTRAP_ADMIN_NAMESPACE").unwrap_or_else(|| "default".into());
                if !crate::config::is_valid_identifier(&agent_id) {
                    return Err(err("TMWS_BOOTSTRAP_ADMIN_ID", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
                }
                if !crate::config::is_valid_identifier(&namespace) {
                    return Err(err("TMWS_BOOTSTRAP_ADMIN_NAMESPACE", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
                }
                Some(BootstrapAdmin { key, agent_id, namespace })
            }
        };
        if bootstrap_admin.is_some() && !auth_enabled {
            return Err(err("TMWS_BOOTSTRAP_ADMIN_KEY", "is only used with TMWS_AUTH_ENABLED=true"));
        }

        let rate_limit = RateLimitConfig {
            // On by default whenever callers are authenticated.
            enabled: parse_bool(get, "TMWS_RATE_LIMIT_ENABLED", auth_enabled)?,
            fail_open: parse_bool(get, "TMWS_RATE_LIMIT_FAIL_OPEN", true)?,
            read: rate(get, ("TMWS_RATE_LIMIT_READ_PER_SEC", 100.0), ("TMWS_RATE_LIMIT_READ_BURST", 200))?,
            write: rate(get, ("TMWS_RATE_LIMIT_WRITE_PER_SEC", 50.0), ("TMWS_RATE_LIMIT_WRITE_BURST", 100))?,
            search: rate(get, ("TMWS_RATE_LIMIT_SEARCH_PER_SEC", 20.0), ("TMWS_RATE_LIMIT_SEARCH_BURST", 40))?,
            claim: rate(get, ("TMWS_RATE_LIMIT_CLAIM_PER_SEC", 100.0), ("TMWS_RATE_LIMIT_CLAIM_BURST", 200))?,
        };
        let redis_prefix = get("TMWS_REDIS_PREFIX").unwrap_or_else(|| "tmws:".into());
        if redis_prefix.len() > 64 || redis_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("TMWS_REDIS_PREFIX", "must be at most 64 characters without spaces"));
        }
        let request_timeout_max = parse_duration(get, "TMWS_REQUEST_TIMEOUT_MAX", Duration::from_secs(60))?;
        if request_timeout_max.is_zero() {
            return Err(err("TMWS_REQUEST_TIMEOUT_MAX", "must be greater than zero"));
        }
        let max_concurrent_requests = parse_range(get, "TMWS_MAX_CONCURRENT_REQUESTS", 1024, 1, 1_000_000)?;
        let audit_retention = parse_duration(get, "TMWS_AUDIT_RETENTION", Duration::from_secs(90 * 86_400))?;
        let audit_sweep_interval = parse_duration(get, "TMWS_AUDIT_SWEEP_INTERVAL", Duration::from_secs(600))?;
        if audit_sweep_interval.is_zero() {
            return Err(err("TMWS_AUDIT_SWEEP_INTERVAL", "must be greater than zero"));
        }
        let auth_cache_ttl = parse_duration(get, "TMWS_AUTH_CACHE_TTL", Duration::from_secs(1))?;
        let auth_cache_entries = parse_range(get, "TMWS_AUTH_CACHE_ENTRIES", 10_000, 0, 10_000_000)?;
        Ok(Self {
            auth_cache_ttl,
            auth_cache_entries,
            jwt,
            tls,
            bootstrap_admin,
            rate_limit,
            redis_prefix,
            request_timeout_max,
            max_concurrent_requests,
            audit_retention,
            audit_sweep_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::{Config, ConfigError};

    const SECRET: &str = "k9Qv2mX7pL4sT8wZ1bN6cR3yH5jD0fGa";

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn prod(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let mut v = vec![
            ("TMWS_ENVIRONMENT", "production"),
            ("TMWS_DATABASE_URL", "postgres://db/tmws"),
            ("TMWS_SECRET_KEY", SECRET),
        ];
        v.extend_from_slice(extra);
        cfg(&v)
    }

    #[test]
    fn production_refuses_plaintext_unless_tls_terminates_upstream() {
        assert_eq!(prod(&[]).unwrap_err().variable, "TMWS_TLS_CERT");
        let c = prod(&[("TMWS_TLS_TERMINATED_UPSTREAM", "true")]).expect("mesh terminates TLS");
        assert!(c.auth_enabled && c.security.rate_limit.enabled);
        let c = prod(&[("TMWS_TLS_CERT", "/c.pem"), ("TMWS_TLS_KEY", "/k.pem")]).expect("TLS on");
        assert!(c.security.tls.enabled());
        assert_eq!(prod(&[("TMWS_TLS_CERT", "/c.pem")]).unwrap_err().variable, "TMWS_TLS_KEY");
        assert_eq!(prod(&[("TMWS_TLS_KEY", "/k.pem")]).unwrap_err().variable, "TMWS_TLS_CERT");
        assert_eq!(
            prod(&[("TMWS_TLS_TERMINATED_UPSTREAM", "true"), ("TMWS_TLS_CLIENT_CA", "/ca.pem")]).unwrap_err().variable,
            "TMWS_TLS_CLIENT_CA"
        );
        // Auth off and weak or short secrets stay refused.
        let e = prod(&[("TMWS_TLS_TERMINATED_UPSTREAM", "true"), ("TMWS_AUTH_ENABLED", "false")]).unwrap_err();
        assert_eq!(e.variable, "TMWS_AUTH_ENABLED");
        for weak in ["short-secret", "passwordpasswordpasswordpassword12", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
            let e = cfg(&[
                ("TMWS_ENVIRONMENT", "production"),
                ("TMWS_DATABASE_URL", "postgres://db/tmws"),
                ("TMWS_TLS_TERMINATED_UPSTREAM", "true"),
                ("TMWS_SECRET_KEY", weak),
            ])
            .unwrap_err();
            assert_eq!(e.variable, "TMWS_SECRET_KEY", "{weak}");
        }
    }

    #[test]
    fn trusted_identity_headers_never_with_auth() {
        let e = cfg(&[("TMWS_AUTH_ENABLED", "true"), ("TMWS_SECRET_KEY", SECRET), ("TMWS_DEV_TRUST_HEADERS", "true")])
            .unwrap_err();
        assert_eq!(e.variable, "TMWS_DEV_TRUST_HEADERS");
        cfg(&[("TMWS_DEV_TRUST_HEADERS", "true")]).expect("development aid with auth off");
    }

    #[test]
    fn security_settings_parse_and_validate() {
        let c = cfg(&[]).unwrap();
        assert!(!c.security.rate_limit.enabled, "limits follow auth by default");
        assert_eq!(c.security.redis_prefix, "tmws:");
        assert!(c.security.rate_limit.fail_open);
        let c = cfg(&[
            ("TMWS_RATE_LIMIT_ENABLED", "true"),
            ("TMWS_RATE_LIMIT_WRITE_PER_SEC", "2.5"),
            ("TMWS_RATE_LIMIT_WRITE_BURST", "7"),
            ("TMWS_REDIS_PREFIX", "t1:"),
        ])
        .unwrap();
        assert_eq!((c.security.rate_limit.write.per_sec, c.security.rate_limit.write.burst), (2.5, 7));
        for (name, value) in [
            ("TMWS_RATE_LIMIT_READ_PER_SEC", "-1"),
            ("TMWS_RATE_LIMIT_READ_PER_SEC", "fast"),
            ("TMWS_RATE_LIMIT_CLAIM_BURST", "0"),
            ("TMWS_REQUEST_TIMEOUT_MAX", "0s"),
            ("TMWS_MAX_CONCURRENT_REQUESTS", "0"),
            ("TMWS_JWT_LEEWAY", "1h"),
            ("TMWS_REDIS_PREFIX", "has space"),
        ] {
            assert_eq!(cfg(&[(name, value)]).unwrap_err().variable, name, "{name}={value}");
        }
        // The bootstrap key: well-formed, random enough, and only with auth on.
        let key = "tmws_0123456789abcdef_8f2c9a7d1e6b4053a9c8d7e6f5a4b3c2";
        let auth = [("TMWS_AUTH_ENABLED", "true"), ("TMWS_SECRET_KEY", SECRET)];
        let mut ok = auth.to_vec();
        ok.push(("TMWS_BOOTSTRAP_ADMIN_KEY", key));
        let c = cfg(&ok).expect("bootstrap key");
        assert_eq!(c.security.bootstrap_admin.as_ref().unwrap().agent_id, "admin");
        assert!(!format!("{c:?}").contains("8f2c9a7d1e6b"), "the key is redacted");
        for bad in
            ["tmws_0123456789abcdef_short", "not-a-key", "tmws_0123456789abcdef_00000000000000000000000000000000"]
        {
            let mut v = auth.to_vec();
            v.push(("TMWS_BOOTSTRAP_ADMIN_KEY", bad));
            assert_eq!(cfg(&v).unwrap_err().variable, "TMWS_BOOTSTRAP_ADMIN_KEY", "{bad}");
        }
        assert_eq!(cfg(&[("TMWS_BOOTSTRAP_ADMIN_KEY", key)]).unwrap_err().variable, "TMWS_BOOTSTRAP_ADMIN_KEY");
    }
}
