//! Principals, scopes, credentials and the layers that attach a principal to every request.
//!
//! A principal (agent id, namespace, role, scopes) is what every memory and workflow rule is
//! checked against. Handlers take it with [`principal`]; they never read identity from request
//! fields. The [`layer::AuthLayer`] finds it for every call except `grpc.health.v1.Health` and
//! reflection:
//!
//! - With authentication on, from `authorization: Bearer <credential>` metadata: an API key
//!   (`tmws_<key id>_<secret>`, see [`keys`]) or, when configured, a JWT (see [`jwt`]). Either
//!   way the agent's id, namespace, role and status are loaded from the `agents` table on every
//!   call, so suspending an agent or revoking a key takes effect at once on every replica.
//! - With authentication off (development only) every call runs as the development principal
//!   from configuration (role AGENT); `TMWS_DEV_TRUST_HEADERS=true` (development only, refused
//!   elsewhere) lets local multi-agent setups and tests pick the principal with
//!   `x-tmws-agent-id`, `x-tmws-namespace` and `x-tmws-role` metadata.
//!
//! # Scopes
//!
//! A role allows a set of scopes; an API key may narrow them (a key with no scopes has every
//! scope its agent's role allows). Handlers check the scope their method needs with
//! [`Principal::require_scope`]:
//!
//! | scope | methods |
//! |---|---|
//! | `memory:read` | MemoryService Get, List, Search, GetMemoryStats |
//! | `memory:write` | MemoryService Create, BatchCreate, Update, Delete, Share, Prune (a dry-run Prune needs `memory:read`) |
//! | `workflow:read` | WorkflowService Get*, List*, WatchRun |
//! | `workflow:write` | WorkflowService Create*, Delete*, StartRun, CancelRun |
//! | `worker` | WorkflowService ClaimTasks, HeartbeatTask, CompleteTask, FailTask |
//!
//! Roles: ADMIN and AGENT allow every scope; READONLY allows `memory:read` and `workflow:read`.
//! The AgentService needs no scope: its methods check the role (admin) or act on the caller's
//! own agent and keys only.

pub mod audit;
pub mod bootstrap;
pub mod cache;
pub mod config;
pub mod identity;
pub mod jwt;
pub mod keys;
pub mod layer;
pub mod overload;
pub mod ratelimit;
pub mod setup;
pub mod tls;

use std::fmt;

use crate::{config::is_valid_identifier, error::Error};

pub use layer::AuthLayer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
            "readonly" | "read-only" | "read_only" => Some(Role::Readonly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Readonly => "readonly",
        }
    }

    /// Database representation.
    pub fn as_i16(self) -> i16 {
        match self {
            Role::Admin => 1,
            Role::Agent => 2,
            Role::Readonly => 3,
        }
    }

    pub fn from_i16(v: i16) -> Option<Role> {
        match v {
            1 => Some(Role::Admin),
            2 => Some(Role::Agent),
            3 => Some(Role::Readonly),
            _ => None,
        }
    }

    /// Every scope this role allows.
    pub fn allowed_scopes(self) -> Scopes {
        match self {
            Role::Admin | Role::Agent => Scopes::ALL,
            Role::Readonly => Scopes::from_iter([Scope::MemoryRead, Scope::WorkflowRead]),
        }
    }
}

/// Whether an agent may authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    Active,
    Suspended,
}

impl AgentStatus {
    pub fn as_i16(self) -> i16 {
        match self {
            AgentStatus::Active => 1,
            AgentStatus::Suspended => 2,
        }
    }

    pub fn from_i16(v: i16) -> Option<AgentStatus> {
        match v {
            1 => Some(AgentStatus::Active),
            2 => Some(AgentStatus::Suspended),
            _ => None,
        }
    }
}

/// One permission a credential may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    MemoryRead,
    MemoryWrite,
    WorkflowRead,
    WorkflowWrite,
    /// Claim, heartbeat, complete and fail workflow tasks.
    Worker,
}

impl Scope {
    pub const ALL: [Scope; 5] =
        [Scope::MemoryRead, Scope::MemoryWrite, Scope::WorkflowRead, Scope::WorkflowWrite, Scope::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::MemoryRead => "memory:read",
            Scope::MemoryWrite => "memory:write",
            Scope::WorkflowRead => "workflow:read",
            Scope::WorkflowWrite => "workflow:write",
            Scope::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> u8 {
        match self {
            Scope::MemoryRead => 1,
            Scope::MemoryWrite => 2,
            Scope::WorkflowRead => 4,
            Scope::WorkflowWrite => 8,
            Scope::Worker => 16,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    pub const ALL: Scopes = Scopes(31);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    pub fn intersect(self, other: Scopes) -> Scopes {
        Scopes(self.0 & other.0)
    }

    pub fn is_subset_of(self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    pub fn to_strings(self) -> Vec<String> {
        self.iter().map(|s| s.as_str().to_string()).collect()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut out = Scopes::NONE;
        for s in iter {
            out.insert(s);
        }
        out
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Scope::as_str)).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub agent_id: String,
    pub namespace: String,
    pub role: Role,
    /// What this call may do: the role's scopes, narrowed by the credential's.
    pub scopes: Scopes,
}

impl Principal {
    /// A principal with every scope its role allows.
    pub fn new(agent_id: impl Into<String>, namespace: impl Into<String>, role: Role) -> Self {
        Self { agent_id: agent_id.into(), namespace: namespace.into(), role, scopes: role.allowed_scopes() }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// PERMISSION_DENIED unless this call's credential carries `scope`.
    pub fn require_scope(&self, scope: Scope) -> Result<(), Error> {
        if self.scopes.contains(scope) {
            return Ok(());
        }
        if !self.role.allowed_scopes().contains(scope) {
            return Err(Error::PermissionDenied(format!(
                "{} agents do not have the scope {scope}",
                self.role.as_str()
            )));
        }
        Err(Error::PermissionDenied(format!("this credential is not granted the scope {scope}")))
    }

    /// Readonly agents cannot change anything.
    pub fn ensure_can_write(&self) -> Result<(), Error> {
        if self.role == Role::Readonly {
            return Err(Error::PermissionDenied("read-only agents cannot write".into()));
        }
        Ok(())
    }

    /// PERMISSION_DENIED unless the caller is an admin.
    pub fn ensure_admin(&self) -> Result<(), Error> {
        if !self.is_admin() {
            return Err(Error::PermissionDenied("only admins may do this".into()));
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

/// How the caller proved who it is (attached to the request extensions beside the principal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key; the key id is its visible part.
    ApiKey { key_id: String },
    /// A JWT whose `sub` is the agent.
    Jwt,
    /// Authentication is off (development).
    Development,
}

/// What the layer found for a request: a principal, or why there is none.
#[derive(Debug, Clone)]
pub struct AuthOutcome(pub Result<Principal, String>);

/// The caller's principal, as attached by [`AuthLayer`]; UNAUTHENTICATED otherwise.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Error> {
    match request.extensions().get::<AuthOutcome>() {
        Some(AuthOutcome(Ok(p))) => Ok(p.clone()),
        Some(AuthOutcome(Err(why))) => Err(Error::Unauthenticated(why.clone())),
        None => Err(Error::Unauthenticated("no credentials".into())),
    }
}

/// The credential behind the caller's principal, if any.
pub fn credential<T>(request: &tonic::Request<T>) -> Option<Credential> {
    request.extensions().get::<Credential>().cloned()
}

/// Who asked what, from where: recorded with every audit event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// `package.Service/Method`.
    pub method: String,
    /// The client's address, when known.
    pub peer: Option<String>,
    /// The `x-request-id` metadata the client sent, or one the server made (echoed in the
    /// response's `x-request-id`).
    pub request_id: String,
}

/// The request context the layer attached (a minimal one when there is none, e.g. in unit tests).
pub fn request_context<T>(request: &tonic::Request<T>) -> RequestContext {
    request.extensions().get::<RequestContext>().cloned().unwrap_or_else(|| RequestContext {
        method: String::new(),
        peer: request.remote_addr().map(|a| a.to_string()),
        request_id: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_roles_and_narrow() {
        let admin = Principal::new("a", "ns", Role::Admin);
        assert!(admin.require_scope(Scope::Worker).is_ok());
        let ro = Principal::new("r", "ns", Role::Readonly);
        assert!(ro.require_scope(Scope::MemoryRead).is_ok());
        assert!(ro.require_scope(Scope::MemoryWrite).is_err());
        let mut narrowed = Principal::new("n", "ns", Role::Agent);
        narrowed.scopes = Scopes::from_iter([Scope::MemoryRead]);
        assert!(narrowed.require_scope(Scope::MemoryWrite).is_err());
        assert!(Scopes::from_iter([Scope::MemoryRead]).is_subset_of(Scopes::ALL));
        assert!(!Scopes::ALL.is_subset_of(Role::Readonly.allowed_scopes()));
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scopes::ALL.iter().count(), 5);
    }

    #[test]
    fn namespaces() {
        let agent = Principal::new("a", "red", Role::Agent);
        assert_eq!(agent.target_namespace("").unwrap(), "red");
        assert!(agent.target_namespace("blue").is_err());
        let admin = Principal::new("root", "red", Role::Admin);
        assert_eq!(admin.target_namespace("blue").unwrap(), "blue");
        assert!(admin.target_namespace("bad ns").is_err());
    }
}
