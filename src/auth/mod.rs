//! Principals and the layer that attaches one to every request.
//!
//! A principal (agent id, namespace, role) is what every memory and workflow rule is checked
//! against. Handlers take it with [`principal`]; they never read identity from request fields.
//! With authentication off (development only) every call runs as the development principal
//! from configuration; `TMWS_DEV_TRUST_HEADERS=true` (development only, refused elsewhere)
//! lets local multi-agent setups and tests pick the principal with `x-tmws-agent-id`,
//! `x-tmws-namespace` and `x-tmws-role` metadata.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tower::{Layer, Service};

use crate::{
    config::{DevPrincipalConfig, is_valid_identifier},
    error::Error,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Agent,
    Readonly,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "admin" => Some(Role::Admin),
            "agent" => Some(Role::Agent),
            "readonly" => Some(Role::Readonly),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub agent_id: String,
    pub namespace: String,
    pub role: Role,
}

impl Principal {
    pub fn new(agent_id: impl Into<String>, namespace: impl Into<String>, role: Role) -> Self {
        Self { agent_id: agent_id.into(), namespace: namespace.into(), role }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Readonly agents cannot change anything.
    pub fn ensure_can_write(&self) -> Result<(), Error> {
        if self.role == Role::Readonly {
            return Err(Error::PermissionDenied("read-only agents cannot write".into()));
        }
        Ok(())
    }

    /// The namespace a call addresses: the caller's own when `requested` is empty; another one
    /// only for admins.
    pub fn target_namespace(&self, requested: &str) -> Result<String, Error> {
        if requested.is_empty() || requested == self.namespace {
            return Ok(self.namespace.clone());
        }
        if !self.is_admin() {
            return Err(Error::PermissionDenied("only admins may address another namespace".into()));
        }
        if !is_valid_identifier(requested) {
            return Err(Error::invalid("namespace", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
        }
        Ok(requested.to_string())
    }
}

/// What the layer found for a request: a principal, or why there is none.
#[derive(Debug, Clone)]
pub struct AuthOutcome(pub Result<Principal, String>);

/// The caller's principal, as attached by [`PrincipalLayer`]; UNAUTHENTICATED otherwise.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Error> {
    match request.extensions().get::<AuthOutcome>() {
        Some(AuthOutcome(Ok(p))) => Ok(p.clone()),
        Some(AuthOutcome(Err(why))) => Err(Error::Unauthenticated(why.clone())),
        None => Err(Error::Unauthenticated("no credentials".into())),
    }
}

/// Tower layer attaching an [`AuthOutcome`] to every HTTP/2 request.
#[derive(Clone)]
pub struct PrincipalLayer {
    dev: Arc<DevPrincipalConfig>,
}

impl PrincipalLayer {
    pub fn development(dev: DevPrincipalConfig) -> Self {
        Self { dev: Arc::new(dev) }
    }
}

impl<S> Layer<S> for PrincipalLayer {
    type Service = PrincipalService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PrincipalService { inner, dev: self.dev.clone() }
    }
}

#[derive(Clone)]
pub struct PrincipalService<S> {
    inner: S,
    dev: Arc<DevPrincipalConfig>,
}

impl<S, B> Service<http::Request<B>> for PrincipalService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let outcome = dev_principal(&self.dev, req.headers());
        req.extensions_mut().insert(AuthOutcome(outcome));
        self.inner.call(req)
    }
}

fn dev_principal(dev: &DevPrincipalConfig, headers: &http::HeaderMap) -> Result<Principal, String> {
    let mut principal =
        Principal { agent_id: dev.agent_id.clone(), namespace: dev.namespace.clone(), role: Role::Agent };
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
    }
    Ok(principal)
}
