//! The authentication layer: every call except health and reflection passes through it.
//!
//! For each call it
//! 1. builds the [`RequestContext`] (method, peer address, `x-request-id` — taken from the
//!    client or made here, and echoed in the response),
//! 2. authenticates the caller ([`Authenticator`]) and answers UNAUTHENTICATED (missing,
//!    malformed, unknown, expired or revoked credentials) or PERMISSION_DENIED (a suspended
//!    agent) itself, so no handler ever runs for an unauthenticated caller,
//! 3. applies the caller's rate limit for the method's class (RESOURCE_EXHAUSTED with
//!    `retry-after`),
//! 4. attaches [`AuthOutcome`], [`Credential`] and [`RequestContext`] to the request extensions
//!    for the handlers ([`super::principal`], [`super::request_context`]),
//! 5. after the response, hands failed mutating calls and authentication failures to the
//!    [`AuditSink`] (successful changes are audited by the stores inside their transactions; for
//!    services not listed in [`AUDITED_IN_TRANSACTION`] the layer records successes too).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use chrono::Utc;
use http::{HeaderMap, HeaderValue};
use tonic::Code;
use tower::{Layer, Service};
use uuid::Uuid;

use super::{
    AuthOutcome, Credential, Principal, RequestContext, Role, Scope, Scopes,
    audit::AuditSink,
    cache::AuthCache,
    jwt::JwtVerifier,
    keys,
    overload::{is_infrastructure_path, status_response},
    ratelimit::{MethodClass, RateLimiter},
};
use crate::{
    auth::AgentStatus,
    config::{DevPrincipalConfig, is_valid_identifier},
    error::Error,
    store::{Db, identity::AuditEvent},
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Services (or single methods, `Service/Method`) whose successful changes are audited inside
/// the change's own transaction; the layer records successes of every other mutating call.
pub const AUDITED_IN_TRANSACTION: &[&str] =
    &["tmws.v1.AgentService/", "tmws.v1.MemoryService/", "tmws.v1.WorkflowService/"];
/// Exceptions to [`AUDITED_IN_TRANSACTION`]: audited by the layer after the response.
const AUDITED_BY_LAYER: &[&str] = &["tmws.v1.MemoryService/PruneMemories"];

fn audited_in_transaction(method: &str) -> bool {
    AUDITED_IN_TRANSACTION.iter().any(|p| method.starts_with(p)) && !AUDITED_BY_LAYER.contains(&method)
}

/// The canonical name of a gRPC code (`PERMISSION_DENIED`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Why a caller has no principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
    /// The agent the credential named, when it named a known one.
    pub agent_id: Option<String>,
    pub namespace: Option<String>,
    /// The API key id presented (never the secret).
    pub key_id: Option<String>,
}

impl AuthFailure {
    fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            code: Code::Unauthenticated,
            reason: "UNAUTHENTICATED",
            message: message.into(),
            agent_id: None,
            namespace: None,
            key_id: None,
        }
    }

    fn with_key(mut self, key_id: &str) -> Self {
        self.key_id = Some(key_id.to_string());
        self
    }

    fn unavailable(e: Error) -> Self {
        tracing::warn!(error = %e, "authentication lookup failed");
        Self {
            code: Code::Unavailable,
            reason: "DEPENDENCY_UNAVAILABLE",
            message: "authentication is temporarily unavailable; retry later".into(),
            agent_id: None,
            namespace: None,
            key_id: None,
        }
    }

    fn suspended(agent_id: &str, namespace: &str) -> Self {
        Self {
            code: Code::PermissionDenied,
            reason: "AGENT_SUSPENDED",
            message: format!("agent {agent_id:?} is suspended"),
            agent_id: Some(agent_id.to_string()),
            namespace: Some(namespace.to_string()),
            key_id: None,
        }
    }
}

enum Mode {
    /// Authentication off (development): the development principal.
    Development(DevPrincipalConfig),
    Enabled {
        pg: Db,
        jwt: Option<JwtVerifier>,
        /// Found credentials, remembered (PostgreSQL; see src/auth/cache.rs).
        cache: Option<Arc<AuthCache>>,
    },
}

/// Finds the principal of a call from its metadata.
pub struct Authenticator {
    mode: Mode,
}

impl Authenticator {
    pub fn development(dev: DevPrincipalConfig) -> Self {
        Self { mode: Mode::Development(dev) }
    }

    pub fn enabled(pg: Db, jwt: Option<JwtVerifier>, cache: Option<Arc<AuthCache>>) -> Self {
        Self { mode: Mode::Enabled { pg, jwt, cache } }
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<(Principal, Credential), AuthFailure> {
        let (pg, jwt, cache) = match &self.mode {
            Mode::Development(dev) => {
                return dev_principal(dev, headers)
                    .map(|p| (p, Credential::Development))
                    .map_err(AuthFailure::unauthenticated);
            }
            Mode::Enabled { pg, jwt, cache } => (pg, jwt, cache.as_deref()),
        };
        let value = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
            AuthFailure::unauthenticated("missing credentials: send `authorization: Bearer <API key or JWT>` metadata")
        })?;
        let value = value.to_str().map_err(|_| AuthFailure::unauthenticated("malformed authorization metadata"))?;
        let token = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => return Err(AuthFailure::unauthenticated("authorization must be `Bearer <API key or JWT>`")),
        };
        if token.is_empty() {
            return Err(AuthFailure::unauthenticated("empty bearer credential"));
        }
        if token.starts_with(keys::KEY_PREFIX) {
            return api_key_principal(pg, cache, token).await;
        }
        if token.matches('.').count() == 2 {
            let Some(jwt) = jwt else {
                return Err(AuthFailure::unauthenticated("JWT authentication is not enabled on this server"));
            };
            let verified = jwt.verify(token).map_err(AuthFailure::unauthenticated)?;
            let agent = match cache.and_then(|c| c.agent(&verified.subject)) {
                Some(agent) => agent,
                None => {
                    let epoch = cache.and_then(AuthCache::epoch);
                    let agent = Arc::new(
                        pg.get_agent(&verified.subject)
                            .await
                            .map_err(AuthFailure::unavailable)?
                            .ok_or_else(|| AuthFailure::unauthenticated("JWT sub is not a known agent"))?,
                    );
                    if let (Some(c), Some(e)) = (cache, epoch) {
                        c.insert_agent(e, agent.clone());
                    }
                    agent
                }
            };
            if agent.status != AgentStatus::Active {
                return Err(AuthFailure::suspended(&agent.id, &agent.namespace));
            }
            let mut p = Principal::new(agent.id.clone(), agent.namespace.clone(), agent.role);
            if let Some(s) = verified.scopes {
                p.scopes = p.scopes.intersect(s);
            }
            return Ok((p, Credential::Jwt));
        }
        Err(AuthFailure::unauthenticated("malformed credential: expected an API key (tmws_...) or a JWT"))
    }
}

async fn api_key_principal(
    pg: &Db,
    cache: Option<&AuthCache>,
    token: &str,
) -> Result<(Principal, Credential), AuthFailure> {
    let parsed = keys::parse(token).ok_or_else(|| AuthFailure::unauthenticated("malformed API key"))?;
    let invalid = || AuthFailure::unauthenticated("invalid API key").with_key(parsed.key_id);
    let found = match cache.and_then(|c| c.key(parsed.key_id)) {
        Some(found) => found,
        None => {
            let epoch = cache.and_then(AuthCache::epoch);
            let found = Arc::new(
                pg.lookup_api_key(parsed.key_id).await.map_err(AuthFailure::unavailable)?.ok_or_else(invalid)?,
            );
            if let (Some(c), Some(e)) = (cache, epoch) {
                c.insert_key(e, parsed.key_id, found.clone());
            }
            found
        }
    };
    if !keys::verify(parsed.secret, &found.secret_hash) {
        return Err(invalid());
    }
    let known = |mut f: AuthFailure| {
        f.agent_id = Some(found.agent.id.clone());
        f.namespace = Some(found.agent.namespace.clone());
        f.with_key(parsed.key_id)
    };
    if found.key.revoke_time.is_some() {
        return Err(known(AuthFailure::unauthenticated("API key has been revoked")));
    }
    if found.key.expire_time.is_some_and(|t| t <= Utc::now()) {
        return Err(known(AuthFailure::unauthenticated("API key has expired")));
    }
    if found.agent.status != AgentStatus::Active {
        return Err(AuthFailure::suspended(&found.agent.id, &found.agent.namespace).with_key(parsed.key_id));
    }
    let mut p = Principal::new(found.agent.id.clone(), found.agent.namespace.clone(), found.agent.role);
    if !found.key.scopes.is_empty() {
        let key_scopes: Scopes = found.key.scopes.iter().filter_map(|s| Scope::parse(s)).collect();
        p.scopes = p.scopes.intersect(key_scopes);
    }
    Ok((p, Credential::ApiKey { key_id: found.key.id.clone() }))
}

fn dev_principal(dev: &DevPrincipalConfig, headers: &HeaderMap) -> Result<Principal, String> {
    let mut principal = Principal::new(dev.agent_id.clone(), dev.namespace.clone(), Role::Agent);
    if !dev.trust_headers {
        return Ok(principal);
    }
    let header = |name: &str| -> Result<Option<String>, String> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(|s| Some(s.trim().to_string())).map_err(|_| format!("{name} is not valid ASCII")),
        }
    };
    if let Some(agent) = header("x-tmws-agent-id")? {
        if !is_valid_identifier(&agent) {
            return Err("x-tmws-agent-id must be 1-128 characters of [A-Za-z0-9._:@-]".into());
        }
        principal.agent_id = agent;
    }
    if let Some(ns) = header("x-tmws-namespace")? {
        if !is_valid_identifier(&ns) {
            return Err("x-tmws-namespace must be 1-128 characters of [A-Za-z0-9._:@-]".into());
        }
        principal.namespace = ns;
    }
    if let Some(role) = header("x-tmws-role")? {
        principal.role = Role::parse(&role).ok_or("x-tmws-role must be admin, agent or readonly")?;
        principal.scopes = principal.role.allowed_scopes();
    }
    Ok(principal)
}

struct State {
    auth: Authenticator,
    limiter: RateLimiter,
    audit: Option<AuditSink>,
}

/// Tower layer authenticating, rate-limiting and auditing every call (see the module docs).
#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<State>,
}

impl AuthLayer {
    pub fn new(auth: Authenticator, limiter: RateLimiter, audit: Option<AuditSink>) -> Self {
        Self { state: Arc::new(State { auth, limiter, audit }) }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, state: self.state.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<State>,
}

fn peer_of<B>(req: &http::Request<B>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
        .map(|a| a.to_string())
}

fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::now_v7().to_string())
}

fn set_request_id<B>(resp: &mut http::Response<B>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
}

fn layer_event(
    ctx: &RequestContext,
    code: Code,
    agent: Option<String>,
    ns: Option<String>,
    detail: Option<String>,
) -> AuditEvent {
    AuditEvent {
        id: Uuid::now_v7(),
        time: Some(Utc::now()),
        agent_id: agent,
        namespace: ns,
        method: ctx.method.clone(),
        resource_id: None,
        code: code_name(code).to_string(),
        peer: ctx.peer.clone(),
        request_id: Some(ctx.request_id.clone()),
        detail,
    }
}

impl<S, B, RB> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        if is_infrastructure_path(&path) {
            return Box::pin(self.inner.call(req));
        }
        // The clone waits for its own readiness; the instance polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let ctx = RequestContext {
            method: path.trim_start_matches('/').to_string(),
            peer: peer_of(&req),
            request_id: request_id_of(req.headers()),
        };
        Box::pin(async move {
            let class = MethodClass::of_path(&path);
            let mutating = matches!(class, MethodClass::Write | MethodClass::Claim);
            let (principal, credential) = match state.auth.authenticate(req.headers()).await {
                Ok(found) => found,
                Err(f) => {
                    tracing::info!(method = %ctx.method, peer = ?ctx.peer, code = ?f.code, reason = %f.message, "authentication failed");
                    if let Some(sink) = &state.audit {
                        let detail = match &f.key_id {
                            Some(k) => format!("{} (key id {k})", f.message),
                            None => f.message.clone(),
                        };
                        sink.record(layer_event(&ctx, f.code, f.agent_id.clone(), f.namespace.clone(), Some(detail)));
                    }
                    let mut resp = status_response(f.code, f.reason, f.message);
                    set_request_id(&mut resp, &ctx.request_id);
                    return Ok(resp);
                }
            };
            if let Err(e) = state.limiter.check(&principal.agent_id, class).await {
                let status: tonic::Status = e.into();
                if mutating && let Some(sink) = &state.audit {
                    sink.record(layer_event(
                        &ctx,
                        status.code(),
                        Some(principal.agent_id.clone()),
                        Some(principal.namespace.clone()),
                        Some(status.message().to_string()),
                    ));
                }
                let mut resp = status.into_http();
                set_request_id(&mut resp, &ctx.request_id);
                return Ok(resp);
            }
            let agent = principal.agent_id.clone();
            let namespace = principal.namespace.clone();
            req.extensions_mut().insert(AuthOutcome(Ok(principal)));
            req.extensions_mut().insert(credential);
            req.extensions_mut().insert(ctx.clone());
            let mut resp = inner.call(req).await?;
            if mutating && let Some(sink) = &state.audit {
                // Errors are trailers-only responses: the status is in the headers. A response
                // without one succeeded so far (its status follows in the trailers).
                let code =
                    resp.headers().get("grpc-status").map(|v| Code::from_bytes(v.as_bytes())).unwrap_or(Code::Ok);
                if code != Code::Ok {
                    let message = tonic::Status::from_header_map(resp.headers()).map(|s| s.message().to_string());
                    sink.record(layer_event(&ctx, code, Some(agent), Some(namespace), message));
                } else if !audited_in_transaction(&ctx.method) {
                    sink.record(layer_event(&ctx, code, Some(agent), Some(namespace), None));
                }
            }
            set_request_id(&mut resp, &ctx.request_id);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactional_audit_sets() {
        assert!(audited_in_transaction("tmws.v1.MemoryService/CreateMemory"));
        assert!(audited_in_transaction("tmws.v1.AgentService/CreateApiKey"));
        assert!(!audited_in_transaction("tmws.v1.MemoryService/PruneMemories"));
        assert!(audited_in_transaction("tmws.v1.WorkflowService/StartRun"));
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id_of(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static(""));
        assert_eq!(request_id_of(&h).len(), 36);
    }

    #[tokio::test]
    async fn development_principal_and_trusted_headers() {
        let dev =
            DevPrincipalConfig { agent_id: "dev-agent".into(), namespace: "default".into(), trust_headers: false };
        let auth = Authenticator::development(dev.clone());
        let mut h = HeaderMap::new();
        h.insert("x-tmws-role", HeaderValue::from_static("admin"));
        let (p, c) = auth.authenticate(&h).await.unwrap();
        assert_eq!((p.agent_id.as_str(), p.role, c), ("dev-agent", Role::Agent, Credential::Development));
        let auth = Authenticator::development(DevPrincipalConfig { trust_headers: true, ..dev });
        let (p, _) = auth.authenticate(&h).await.unwrap();
        assert_eq!(p.role, Role::Admin);
        h.insert("x-tmws-role", HeaderValue::from_static("root"));
        assert_eq!(auth.authenticate(&h).await.unwrap_err().code, Code::Unauthenticated);
    }
}
