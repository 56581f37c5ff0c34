//! The identity domain behind the AgentService: who may create, see and change agents, keys
//! and audit events. No tonic here; the adapter is `crate::api::agent`.
//!
//! Rules:
//! - Creating and changing agents, and reading the audit log, is for admins.
//! - Anyone may make keys for itself, with at most the scopes of the credential it calls with
//!   (a narrowed key cannot mint a wider one); admins may make keys for any agent.
//! - Managing other agents (creating or changing agents, keys for others, revoking others'
//!   keys) needs an unrestricted credential: a key narrowed to some scopes is meant for data
//!   calls, not for administration.
//! - Agents see themselves and the agents of their namespace; another namespace's agents are
//!   NOT_FOUND to them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{AgentStatus, Principal, RequestContext, Role, Scope, Scopes, cache::AuthCache, keys};
use crate::{
    config::is_valid_identifier,
    error::{Error, FieldViolation, Result},
    page_token::PageTokens,
    store::{
        Db,
        identity::{Agent, ApiKey, AuditEvent, AuditFilter, NewAgent, NewApiKey},
    },
};

const MAX_DISPLAY_NAME: usize = 256;

#[derive(Clone)]
pub struct IdentityService {
    pg: Db,
    tokens: PageTokens,
    default_page_size: usize,
    max_page_size: usize,
    /// The authenticator's credential cache, emptied by this replica's own changes before they
    /// answer (other replicas hear of them through `tmws_identity`).
    cache: Option<Arc<AuthCache>>,
}

#[derive(Serialize)]
struct PageQuery<'a, F: Serialize> {
    method: &'static str,
    caller: &'a str,
    filter: F,
}

impl IdentityService {
    pub async fn new(
        pg: Db,
        default_page_size: usize,
        max_page_size: usize,
        cache: Option<Arc<AuthCache>>,
    ) -> anyhow::Result<Self> {
        // The page-token key shared by every replica (the same one the memory service uses).
        let key = pg
            .secret("page_token_key", &|| {
                let mut key = vec![0u8; 32];
                let _ = getrandom::fill(&mut key);
                key
            })
            .await?;
        anyhow::ensure!(key.iter().any(|b| *b != 0), "could not generate a random page token key");
        Ok(Self { pg, tokens: PageTokens::new(&key)?, default_page_size, max_page_size, cache })
    }

    fn page_size(&self, requested: i32) -> Result<usize> {
        if requested < 0 {
            return Err(Error::invalid("page_size", "must not be negative"));
        }
        Ok(if requested == 0 { self.default_page_size } else { (requested as usize).min(self.max_page_size) })
    }

    fn unrestricted(p: &Principal) -> Result<()> {
        if p.scopes != p.role.allowed_scopes() {
            return Err(Error::PermissionDenied(
                "a credential narrowed to some scopes cannot manage other agents or their keys".into(),
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create_agent(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        id: String,
        namespace: String,
        display_name: String,
        role: Option<Role>,
        request_id: String,
    ) -> Result<Agent> {
        p.ensure_admin()?;
        Self::unrestricted(p)?;
        let mut v = Vec::new();
        if !id.is_empty() && !is_valid_identifier(&id) {
            v.push(FieldViolation::new("agent.id", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
        }
        if namespace.is_empty() {
            v.push(FieldViolation::new("agent.namespace", "required"));
        } else if !is_valid_identifier(&namespace) {
            v.push(FieldViolation::new("agent.namespace", "must be 1-128 characters of [A-Za-z0-9._:@-]"));
        }
        if display_name.len() > MAX_DISPLAY_NAME {
            v.push(FieldViolation::new("agent.display_name", format!("must be at most {MAX_DISPLAY_NAME} bytes")));
        }
        if role.is_none() {
            v.push(FieldViolation::new("agent.role", "required: ADMIN, AGENT or READONLY"));
        }
        if request_id.len() > 128 {
            v.push(FieldViolation::new("request_id", "must be at most 128 bytes"));
        }
        let Some(role) = role.filter(|_| v.is_empty()) else { return Err(Error::InvalidArgument(v)) };
        let id = if id.is_empty() { Uuid::now_v7().to_string() } else { id };
        let audit = AuditEvent::ok(p, &namespace, ctx, &id);
        self.pg
            .create_agent(
                &NewAgent {
                    id,
                    namespace,
                    display_name,
                    role,
                    request_id: (!request_id.is_empty()).then_some(request_id),
                },
                Some(&audit),
            )
            .await
    }

    /// Yourself, an agent of your namespace, or (admins) anyone; NOT_FOUND otherwise.
    pub async fn get_agent(&self, p: &Principal, id: &str) -> Result<Agent> {
        if id.is_empty() {
            return Err(Error::invalid("id", "required"));
        }
        let agent = self.pg.get_agent(id).await?.ok_or_else(|| Error::not_found("agent", id))?;
        if p.is_admin() || agent.id == p.agent_id || agent.namespace == p.namespace {
            Ok(agent)
        } else {
            Err(Error::not_found("agent", id))
        }
    }

    pub async fn list_agents(
        &self,
        p: &Principal,
        requested_ns: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Agent>, String)> {
        let ns = p.target_namespace(requested_ns)?;
        let limit = self.page_size(page_size)?;
        let query = PageQuery { method: "ListAgents", caller: &p.agent_id, filter: &ns };
        let after: Option<String> =
            if page_token.is_empty() { None } else { Some(self.tokens.decode(page_token, &query)?) };
        let mut rows = self.pg.list_agents(Some(&ns), after.as_deref(), limit + 1).await?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|a| self.tokens.encode(&query, &a.id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    pub async fn update_agent(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        id: &str,
        display_name: Option<String>,
        status: Option<AgentStatus>,
        etag: &str,
    ) -> Result<Agent> {
        p.ensure_admin()?;
        Self::unrestricted(p)?;
        if id.is_empty() {
            return Err(Error::invalid("agent.id", "required"));
        }
        if display_name.is_none() && status.is_none() {
            return Err(Error::invalid("update_mask", "names no field to update (display_name, status)"));
        }
        if display_name.as_ref().is_some_and(|d| d.len() > MAX_DISPLAY_NAME) {
            return Err(Error::invalid("agent.display_name", format!("must be at most {MAX_DISPLAY_NAME} bytes")));
        }
        if id == p.agent_id && status == Some(AgentStatus::Suspended) {
            return Err(Error::FailedPrecondition("an admin cannot suspend itself".into()));
        }
        let expected = if etag.is_empty() {
            None
        } else {
            Some(etag.strip_prefix('v').and_then(|v| v.parse().ok()).unwrap_or(-1))
        };
        let current = self.pg.get_agent(id).await?.ok_or_else(|| Error::not_found("agent", id))?;
        let audit = AuditEvent::ok(p, &current.namespace, ctx, id);
        let outcome = self.pg.update_agent(id, expected, display_name.as_deref(), status, &audit).await;
        self.forget_credentials();
        outcome
    }

    /// Empties the credential cache (called after every change to an agent or a key, whatever
    /// its outcome).
    fn forget_credentials(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// A new key; returns the stored key and the full key string (shown once).
    pub async fn create_api_key(
        &self,
        p: &Principal,
        ctx: &RequestContext,
        agent_id: &str,
        display_name: String,
        scopes: &[String],
        expire_time: Option<DateTime<Utc>>,
    ) -> Result<(ApiKey, String)> {
        let for_self = agent_id.is_empty() || agent_id == p.agent_id;
        let target_id = if for_self { p.agent_id.clone() } else { agent_id.to_string() };
        if !for_self {
            p.ensure_admin()?;
            Self::unrestricted(p)?;
        }
        let mut v = Vec::new();
        let mut requested = Scopes::NONE;
        for (i, s) in scopes.iter().enumerate() {
            match Scope::parse(s) {
                Some(scope) => requested.insert(scope),
                None => v.push(FieldViolation::new(
                    format!("scopes[{i}]"),
                    "unknown scope: use memory:read, memory:write, workflow:read, workflow:write or worker",
                )),
            }
        }
        if display_name.len() > MAX_DISPLAY_NAME {
            v.push(FieldViolation::new("display_name", format!("must be at most {MAX_DISPLAY_NAME} bytes")));
        }
        if expire_time.is_some_and(|t| t <= Utc::now()) {
            v.push(FieldViolation::new("expire_time", "must be in the future"));
        }
        if !v.is_empty() {
            return Err(Error::InvalidArgument(v));
        }
        let target = self.pg.get_agent(&target_id).await?.ok_or_else(|| Error::not_found("agent", &target_id))?;
        let allowed = target.role.allowed_scopes();
        if !requested.is_subset_of(allowed) {
            return Err(Error::invalid(
                "scopes",
                format!(
                    "{} agents cannot hold {:?}",
                    target.role.as_str(),
                    requested.intersect(Scopes(!allowed.0 & Scopes::ALL.0))
                ),
            ));
        }
        // What the new key carries: the requested scopes, or (none requested) everything the
        // calling credential has; for yourself never more than the calling credential.
        let stored: Scopes = if for_self {
            let granted = if requested.is_empty() { p.scopes } else { requested };
            if !granted.is_subset_of(p.scopes) {
                return Err(Error::PermissionDenied("a key cannot have scopes the calling credential lacks".into()));
            }
            granted
        } else if requested.is_empty() {
            allowed
        } else {
            requested
        };
        let stored_list = if stored == allowed { Vec::new() } else { stored.to_strings() };
        if stored.is_empty() {
            return Err(Error::invalid("scopes", "the key would have no scope"));
        }
        let new = keys::generate().map_err(|e| Error::internal(e.to_string()))?;
        let audit = AuditEvent::ok(p, &target.namespace, ctx, &new.key_id);
        let key = self
            .pg
            .create_api_key(
                &NewApiKey {
                    id: new.key_id.clone(),
                    agent_id: target.id,
                    secret_hash: new.secret_hash.to_vec(),
                    display_name,
                    scopes: stored_list,
                    expire_time,
                    created_by: Some(p.agent_id.clone()),
                },
                Some(&audit),
            )
            .await?;
        Ok((key, new.full))
    }

    pub async fn list_api_keys(
        &self,
        p: &Principal,
        agent_id: &str,
        show_revoked: bool,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<ApiKey>, String)> {
        let target = if agent_id.is_empty() { p.agent_id.as_str() } else { agent_id };
        if target != p.agent_id {
            p.ensure_admin()?;
        }
        let limit = self.page_size(page_size)?;
        let query = PageQuery { method: "ListApiKeys", caller: &p.agent_id, filter: (target, show_revoked) };
        let after: Option<(i64, String)> =
            if page_token.is_empty() { None } else { Some(self.tokens.decode(page_token, &query)?) };
        let after = match &after {
            None => None,
            Some((micros, id)) => Some((micros_to_time(*micros)?, id.as_str())),
        };
        let mut rows = self.pg.list_api_keys(target, show_revoked, after, limit + 1).await?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .map(|k| self.tokens.encode(&query, &(k.create_time.timestamp_micros(), k.id.clone())))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// Your own key, or (admins with an unrestricted credential) anyone's; others' keys are
    /// NOT_FOUND to non-admins.
    pub async fn revoke_api_key(&self, p: &Principal, ctx: &RequestContext, id: &str) -> Result<ApiKey> {
        if id.is_empty() {
            return Err(Error::invalid("id", "required"));
        }
        let key = self.pg.get_api_key(id).await?.ok_or_else(|| Error::not_found("api key", id))?;
        if key.agent_id != p.agent_id {
            if !p.is_admin() {
                return Err(Error::not_found("api key", id));
            }
            Self::unrestricted(p)?;
        }
        let ns = self.pg.get_agent(&key.agent_id).await?.map(|a| a.namespace).unwrap_or_default();
        let audit = AuditEvent::ok(p, &ns, ctx, id);
        let outcome = self.pg.revoke_api_key(id, &audit).await;
        self.forget_credentials();
        outcome
    }

    /// The caller's agent row (in development, when the agent is not in the table, one made
    /// from the development principal).
    pub async fn who_am_i(&self, p: &Principal) -> Result<Agent> {
        if let Some(a) = self.pg.get_agent(&p.agent_id).await? {
            return Ok(a);
        }
        let now = Utc::now();
        Ok(Agent {
            id: p.agent_id.clone(),
            namespace: p.namespace.clone(),
            display_name: String::new(),
            role: p.role,
            status: AgentStatus::Active,
            create_time: now,
            update_time: now,
            version: 0,
        })
    }

    pub async fn list_audit_events(
        &self,
        p: &Principal,
        filter: AuditFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<AuditEvent>, String)> {
        p.ensure_admin()?;
        if let (Some(a), Some(b)) = (filter.start_time, filter.end_time)
            && a > b
        {
            return Err(Error::invalid("start_time", "must not be after end_time"));
        }
        let limit = self.page_size(page_size)?;
        let query = PageQuery { method: "ListAuditEvents", caller: &p.agent_id, filter: &filter };
        let after: Option<(i64, Uuid)> =
            if page_token.is_empty() { None } else { Some(self.tokens.decode(page_token, &query)?) };
        let after = match after {
            None => None,
            Some((micros, id)) => Some((micros_to_time(micros)?, id)),
        };
        let mut rows = self.pg.list_audit_events(&filter, after, limit + 1).await?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last()
                .and_then(|e| e.time.map(|t| self.tokens.encode(&query, &(t.timestamp_micros(), e.id))))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }
}

fn micros_to_time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(|| Error::invalid("page_token", "malformed page token"))
}
