//! gRPC adapter for `tmws.v1.AgentService`: take the caller's principal, convert, call the
//! identity domain ([`crate::auth::identity`]), convert back.

use tonic::{Request, Response, Status};

use super::convert::{duration_secs, enum_value, timestamp, to_timestamp};
use crate::{
    auth::{AgentStatus, Credential, Role, credential, identity::IdentityService, principal, request_context},
    error::{Error, Result},
    pb::{self, agent_service_server::AgentService},
    store::identity::{Agent, ApiKey, AuditEvent, AuditFilter},
};

#[derive(Clone)]
pub struct AgentApi {
    service: IdentityService,
}

impl AgentApi {
    pub fn new(service: IdentityService) -> Self {
        Self { service }
    }
}

fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Admin => pb::Role::Admin,
        Role::Agent => pb::Role::Agent,
        Role::Readonly => pb::Role::Readonly,
    }
}

fn status_to_pb(s: AgentStatus) -> pb::AgentStatus {
    match s {
        AgentStatus::Active => pb::AgentStatus::Active,
        AgentStatus::Suspended => pb::AgentStatus::Suspended,
    }
}

fn agent_to_pb(a: Agent) -> pb::Agent {
    let etag = a.etag();
    pb::Agent {
        id: a.id,
        display_name: a.display_name,
        namespace: a.namespace,
        role: role_to_pb(a.role) as i32,
        status: status_to_pb(a.status) as i32,
        create_time: Some(to_timestamp(a.create_time)),
        update_time: Some(to_timestamp(a.update_time)),
        etag,
    }
}

fn key_to_pb(k: ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id,
        agent_id: k.agent_id,
        display_name: k.display_name,
        scopes: k.scopes,
        create_time: Some(to_timestamp(k.create_time)),
        expire_time: k.expire_time.map(to_timestamp),
        revoke_time: k.revoke_time.map(to_timestamp),
        created_by: k.created_by.unwrap_or_default(),
    }
}

fn event_to_pb(e: AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.to_string(),
        time: e.time.map(to_timestamp),
        agent_id: e.agent_id.unwrap_or_default(),
        namespace: e.namespace.unwrap_or_default(),
        method: e.method,
        resource_id: e.resource_id.unwrap_or_default(),
        code: e.code,
        peer: e.peer.unwrap_or_default(),
        request_id: e.request_id.unwrap_or_default(),
        detail: e.detail.unwrap_or_default(),
    }
}

fn role(field: &str, v: i32) -> Result<Option<Role>> {
    Ok(match enum_value::<pb::Role>(field, v)? {
        pb::Role::Unspecified => None,
        pb::Role::Admin => Some(Role::Admin),
        pb::Role::Agent => Some(Role::Agent),
        pb::Role::Readonly => Some(Role::Readonly),
    })
}

fn status(field: &str, v: i32) -> Result<Option<AgentStatus>> {
    Ok(match enum_value::<pb::AgentStatus>(field, v)? {
        pb::AgentStatus::Unspecified => None,
        pb::AgentStatus::Active => Some(AgentStatus::Active),
        pb::AgentStatus::Suspended => Some(AgentStatus::Suspended),
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn create_agent(&self, request: Request<pb::CreateAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let p = principal(&request)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let a = r.agent.ok_or_else(|| Error::invalid("agent", "required"))?;
        let role = role("agent.role", a.role)?;
        if a.status != 0 {
            status("agent.status", a.status)?;
        }
        let agent = self.service.create_agent(&p, &ctx, a.id, a.namespace, a.display_name, role, r.request_id).await?;
        Ok(Response::new(agent_to_pb(agent)))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let p = principal(&request)?;
        let r = request.into_inner();
        Ok(Response::new(agent_to_pb(self.service.get_agent(&p, &r.id).await?)))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let p = principal(&request)?;
        let r = request.into_inner();
        let (agents, next_page_token) = self.service.list_agents(&p, &r.namespace, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.into_iter().map(agent_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_agent(&self, request: Request<pb::UpdateAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let p = principal(&request)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let a = r.agent.ok_or_else(|| Error::invalid("agent", "required"))?;
        let paths: Vec<String> = match r.update_mask {
            Some(m) if !m.paths.is_empty() => m.paths,
            _ => {
                let mut set = Vec::new();
                if !a.display_name.is_empty() {
                    set.push("display_name".to_string());
                }
                if a.status != 0 {
                    set.push("status".to_string());
                }
                set
            }
        };
        let mut display_name = None;
        let mut new_status = None;
        for (i, path) in paths.iter().enumerate() {
            match path.as_str() {
                "display_name" => display_name = Some(a.display_name.clone()),
                "status" => {
                    new_status = Some(
                        status("agent.status", a.status)?
                            .ok_or_else(|| Error::invalid("agent.status", "must be ACTIVE or SUSPENDED"))?,
                    )
                }
                other => {
                    return Err(Error::invalid(
                        format!("update_mask.paths[{i}]"),
                        format!("{other:?} is not updatable; use display_name or status"),
                    )
                    .into());
                }
            }
        }
        let agent = self.service.update_agent(&p, &ctx, &a.id, display_name, new_status, &r.etag).await?;
        Ok(Response::new(agent_to_pb(agent)))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let p = principal(&request)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let expire_time = match (r.expire_time, r.ttl) {
            (Some(_), Some(_)) => return Err(Error::invalid("ttl", "set expire_time or ttl, not both").into()),
            (Some(t), None) => Some(timestamp("expire_time", &t)?),
            (None, Some(d)) => {
                let secs = duration_secs("ttl", &d)?;
                if !(secs > 0.0 && secs < 100.0 * 365.0 * 86_400.0) {
                    return Err(Error::invalid("ttl", "must be positive and less than 100 years").into());
                }
                Some(chrono::Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64))
            }
            (None, None) => None,
        };
        let (key, full) =
            self.service.create_api_key(&p, &ctx, &r.agent_id, r.display_name, &r.scopes, expire_time).await?;
        Ok(Response::new(pb::CreateApiKeyResponse { api_key: Some(key_to_pb(key)), key: full }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let p = principal(&request)?;
        let r = request.into_inner();
        let (keys, next_page_token) =
            self.service.list_api_keys(&p, &r.agent_id, r.show_revoked, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.into_iter().map(key_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn revoke_api_key(&self, request: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let p = principal(&request)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        Ok(Response::new(key_to_pb(self.service.revoke_api_key(&p, &ctx, &r.id).await?)))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let p = principal(&request)?;
        let cred = credential(&request).unwrap_or(Credential::Development);
        let agent = self.service.who_am_i(&p).await?;
        let (credential_type, api_key_id) = match cred {
            Credential::ApiKey { key_id } => ("api_key", key_id),
            Credential::Jwt => ("jwt", String::new()),
            Credential::Development => ("development", String::new()),
        };
        Ok(Response::new(pb::WhoAmIResponse {
            agent: Some(agent_to_pb(agent)),
            scopes: p.scopes.to_strings(),
            credential_type: credential_type.into(),
            api_key_id,
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let p = principal(&request)?;
        let r = request.into_inner();
        let filter = AuditFilter {
            agent_id: non_empty(r.agent_id),
            namespace: non_empty(r.namespace),
            method: non_empty(r.method.trim_start_matches('/').to_string()),
            start_time: r.start_time.map(|t| timestamp("start_time", &t)).transpose()?,
            end_time: r.end_time.map(|t| timestamp("end_time", &t)).transpose()?,
        };
        let (events, next_page_token) = self.service.list_audit_events(&p, filter, r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
            next_page_token,
        }))
    }
}
