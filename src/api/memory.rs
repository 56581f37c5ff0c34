//! gRPC adapter for `tmws.v1.MemoryService`: validate the request's shape, take the caller's
//! principal, convert, call the memory domain, convert back.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::convert::{
    duration_secs, enum_value, json_to_struct, parse_id, parse_optional_id, struct_to_json, timestamp, to_timestamp,
};
use crate::{
    auth::{Scope, principal, request_context},
    error::{Error, Result},
    memory::{
        AccessLevel, Grant, Memory, MemoryFilter, MemoryService, OrderBy, Permission, SearchMode,
        service::{Expiry, MemoryDraft, PatchDraft, SearchRequest},
    },
    pb::{self, memory_service_server::MemoryService as MemoryServiceRpc},
};

#[derive(Clone)]
pub struct MemoryApi {
    service: MemoryService,
}

impl MemoryApi {
    pub fn new(service: MemoryService) -> Self {
        Self { service }
    }
}

fn access_level(field: &str, v: i32) -> Result<Option<AccessLevel>> {
    Ok(match enum_value::<pb::AccessLevel>(field, v)? {
        pb::AccessLevel::Unspecified => None,
        pb::AccessLevel::Private => Some(AccessLevel::Private),
        pb::AccessLevel::Team => Some(AccessLevel::Team),
        pb::AccessLevel::Shared => Some(AccessLevel::Shared),
        pb::AccessLevel::Public => Some(AccessLevel::Public),
        pb::AccessLevel::System => Some(AccessLevel::System),
    })
}

fn access_level_to_pb(l: AccessLevel) -> pb::AccessLevel {
    match l {
        AccessLevel::Private => pb::AccessLevel::Private,
        AccessLevel::Team => pb::AccessLevel::Team,
        AccessLevel::Shared => pb::AccessLevel::Shared,
        AccessLevel::Public => pb::AccessLevel::Public,
        AccessLevel::System => pb::AccessLevel::System,
    }
}

fn with_embedding(view: i32) -> Result<bool> {
    Ok(enum_value::<pb::MemoryView>("view", view)? == pb::MemoryView::Full)
}

pub(crate) fn memory_to_pb(m: Memory) -> pb::Memory {
    let etag = m.etag();
    pb::Memory {
        id: m.id.to_string(),
        namespace: m.namespace,
        owner: m.owner,
        content: m.content,
        summary: m.summary,
        kind: m.kind,
        tags: m.tags,
        metadata: Some(json_to_struct(m.metadata)),
        importance: Some(m.importance),
        access_level: access_level_to_pb(m.access_level) as i32,
        shared_with: m
            .grants
            .into_iter()
            .map(|g| pb::ShareGrant {
                agent_id: g.agent_id,
                permission: match g.permission {
                    Permission::Read => pb::SharePermission::Read,
                    Permission::Write => pb::SharePermission::Write,
                } as i32,
                expire_time: g.expire_time.map(to_timestamp),
            })
            .collect(),
        parent_id: m.parent_id.map(|p| p.to_string()).unwrap_or_default(),
        embedding_model: m.embedding_model.unwrap_or_default(),
        embedding: m.embedding.unwrap_or_default(),
        embedding_dimension: m.embedding_dim.unwrap_or(0),
        create_time: Some(to_timestamp(m.create_time)),
        update_time: Some(to_timestamp(m.update_time)),
        expire_time: m.expire_time.map(to_timestamp),
        ttl: None,
        access_count: m.access_count,
        last_access_time: m.last_access_time.map(to_timestamp),
        etag,
    }
}

fn expiry(
    prefix: &str,
    expire_time: Option<&prost_types::Timestamp>,
    ttl: Option<&prost_types::Duration>,
) -> Result<Option<Expiry>> {
    match (expire_time, ttl) {
        (Some(_), Some(_)) => Err(Error::invalid(format!("{prefix}ttl"), "set expire_time or ttl, not both")),
        (Some(t), None) => Ok(Some(Expiry::At(timestamp(&format!("{prefix}expire_time"), t)?))),
        (None, Some(d)) => Ok(Some(Expiry::Ttl(duration_secs(&format!("{prefix}ttl"), d)?))),
        (None, None) => Ok(None),
    }
}

fn draft(prefix: &str, m: pb::Memory) -> Result<MemoryDraft> {
    Ok(MemoryDraft {
        access_level: access_level(&format!("{prefix}access_level"), m.access_level)?,
        parent_id: parse_optional_id(&format!("{prefix}parent_id"), &m.parent_id)?,
        metadata: m.metadata.map(struct_to_json),
        expiry: expiry(prefix, m.expire_time.as_ref(), m.ttl.as_ref())?,
        content: m.content,
        summary: m.summary,
        kind: m.kind,
        tags: m.tags,
        importance: m.importance,
        embedding: (!m.embedding.is_empty()).then_some(m.embedding),
        embedding_model: (!m.embedding_model.is_empty()).then_some(m.embedding_model),
    })
}

/// Fields UpdateMemory may name in its mask.
const UPDATABLE: &[&str] = &[
    "content",
    "summary",
    "kind",
    "tags",
    "metadata",
    "importance",
    "access_level",
    "parent_id",
    "embedding",
    "embedding_model",
    "expire_time",
    "ttl",
];

fn patch(m: pb::Memory, mask: Option<prost_types::FieldMask>) -> Result<PatchDraft> {
    let paths: Vec<String> = match mask {
        Some(mask) if !mask.paths.is_empty() => {
            for (i, p) in mask.paths.iter().enumerate() {
                if !UPDATABLE.contains(&p.as_str()) {
                    return Err(Error::invalid(
                        format!("update_mask.paths[{i}]"),
                        format!("{p:?} is not an updatable field; use one of {}", UPDATABLE.join(", ")),
                    ));
                }
            }
            mask.paths
        }
        // No mask: every updatable field the caller set.
        _ => {
            let mut set = Vec::new();
            let mut add = |cond: bool, name: &str| {
                if cond {
                    set.push(name.to_string());
                }
            };
            add(!m.content.is_empty(), "content");
            add(!m.summary.is_empty(), "summary");
            add(!m.kind.is_empty(), "kind");
            add(!m.tags.is_empty(), "tags");
            add(m.metadata.is_some(), "metadata");
            add(m.importance.is_some(), "importance");
            add(m.access_level != 0, "access_level");
            add(!m.parent_id.is_empty(), "parent_id");
            add(!m.embedding.is_empty(), "embedding");
            add(m.expire_time.is_some(), "expire_time");
            add(m.ttl.is_some(), "ttl");
            set
        }
    };
    let has = |name: &str| paths.iter().any(|p| p == name);
    let mut d = PatchDraft::default();
    if has("content") {
        d.content = Some(m.content.clone());
    }
    if has("summary") {
        d.summary = Some(m.summary.clone());
    }
    if has("kind") {
        d.kind = Some(m.kind.clone());
    }
    if has("tags") {
        d.tags = Some(m.tags.clone());
    }
    if has("metadata") {
        d.metadata = Some(m.metadata.clone().map(struct_to_json).unwrap_or_else(|| serde_json::json!({})));
    }
    if has("importance") {
        d.importance = Some(m.importance.unwrap_or(0.5));
    }
    if has("access_level") {
        d.access_level = Some(
            access_level("memory.access_level", m.access_level)?
                .ok_or_else(|| Error::invalid("memory.access_level", "must be set when named in update_mask"))?,
        );
    }
    if has("parent_id") {
        d.parent_id = Some(parse_optional_id("memory.parent_id", &m.parent_id)?);
    }
    if has("embedding") {
        if m.embedding.is_empty() {
            return Err(Error::invalid("memory.embedding", "must be set when named in update_mask"));
        }
        d.embedding = Some(m.embedding.clone());
    }
    if has("embedding") || has("embedding_model") {
        d.embedding_model = (!m.embedding_model.is_empty()).then(|| m.embedding_model.clone());
    }
    if has("expire_time") || has("ttl") {
        let e = expiry(
            "memory.",
            if has("expire_time") { m.expire_time.as_ref() } else { None },
            if has("ttl") { m.ttl.as_ref() } else { None },
        )?;
        d.expiry = Some(e);
    }
    Ok(d)
}

fn filter(f: Option<pb::MemoryFilter>) -> Result<MemoryFilter> {
    let Some(f) = f else { return Ok(MemoryFilter::default()) };
    let mut levels = Vec::with_capacity(f.access_levels.len());
    for (i, l) in f.access_levels.iter().enumerate() {
        let field = format!("filter.access_levels[{i}]");
        levels.push(access_level(&field, *l)?.ok_or_else(|| Error::invalid(field, "must not be UNSPECIFIED"))?);
    }
    let time = |field: &str, t: Option<prost_types::Timestamp>| -> Result<Option<DateTime<Utc>>> {
        t.map(|t| timestamp(field, &t)).transpose()
    };
    Ok(MemoryFilter {
        tags_any: f.tags_any,
        tags_all: f.tags_all,
        kinds: f.kinds,
        owners: f.owners,
        access_levels: levels,
        min_importance: f.min_importance,
        max_importance: f.max_importance,
        create_time_after: time("filter.create_time_after", f.create_time_after)?,
        create_time_before: time("filter.create_time_before", f.create_time_before)?,
        metadata_equals: f.metadata_equals.map(struct_to_json).filter(|v| v.as_object().is_some_and(|o| !o.is_empty())),
        parent_id: parse_optional_id("filter.parent_id", &f.parent_id)?,
    })
}

fn etag(e: &str) -> Option<&str> {
    (!e.is_empty()).then_some(e)
}

#[tonic::async_trait]
impl MemoryServiceRpc for MemoryApi {
    async fn create_memory(&self, request: Request<pb::CreateMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let m = r.memory.ok_or_else(|| Error::invalid("memory", "required"))?;
        let d = draft("memory.", m)?;
        let mut out =
            self.service.create_for(&ctx, &p, &r.namespace, vec![("memory.".into(), d, Some(r.request_id))]).await?;
        let m = out.pop().ok_or_else(|| Error::internal("create returned nothing"))?;
        Ok(Response::new(memory_to_pb(m)))
    }

    async fn batch_create_memories(
        &self,
        request: Request<pb::BatchCreateMemoriesRequest>,
    ) -> Result<Response<pb::BatchCreateMemoriesResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let mut items = Vec::with_capacity(r.requests.len());
        for (i, sub) in r.requests.into_iter().enumerate() {
            let prefix = format!("requests[{i}].memory.");
            if !sub.namespace.is_empty() && sub.namespace != r.namespace {
                return Err(Error::invalid(
                    format!("requests[{i}].namespace"),
                    "must be empty or equal the batch namespace",
                )
                .into());
            }
            let m = sub.memory.ok_or_else(|| Error::invalid(format!("requests[{i}].memory"), "required"))?;
            let d = draft(&prefix, m)?;
            // Each item's own request_id, else one derived from the batch's.
            let rid = if !sub.request_id.is_empty() {
                Some(sub.request_id)
            } else if !r.request_id.is_empty() {
                Some(format!("{}#{i}", r.request_id))
            } else {
                None
            };
            items.push((prefix, d, rid));
        }
        let memories = self.service.create_for(&ctx, &p, &r.namespace, items).await?;
        Ok(Response::new(pb::BatchCreateMemoriesResponse {
            memories: memories.into_iter().map(memory_to_pb).collect(),
        }))
    }

    async fn get_memory(&self, request: Request<pb::GetMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryRead)?;
        let r = request.into_inner();
        let id = parse_id("id", &r.id)?;
        let m = self.service.get(&p, &r.namespace, id, with_embedding(r.view)?).await?;
        Ok(Response::new(memory_to_pb(m)))
    }

    async fn update_memory(&self, request: Request<pb::UpdateMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let m = r.memory.ok_or_else(|| Error::invalid("memory", "required"))?;
        let id = parse_id("memory.id", &m.id)?;
        let d = patch(m, r.update_mask)?;
        let m = self.service.update(&ctx, &p, &r.namespace, id, d, etag(&r.etag)).await?;
        Ok(Response::new(memory_to_pb(m)))
    }

    async fn delete_memory(
        &self,
        request: Request<pb::DeleteMemoryRequest>,
    ) -> Result<Response<pb::DeleteMemoryResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let id = parse_id("id", &r.id)?;
        self.service.delete(&ctx, &p, &r.namespace, id, etag(&r.etag)).await?;
        Ok(Response::new(pb::DeleteMemoryResponse {}))
    }

    async fn list_memories(
        &self,
        request: Request<pb::ListMemoriesRequest>,
    ) -> Result<Response<pb::ListMemoriesResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryRead)?;
        let r = request.into_inner();
        let order = match enum_value::<pb::MemoryOrderBy>("order_by", r.order_by)? {
            pb::MemoryOrderBy::Unspecified | pb::MemoryOrderBy::CreateTimeDesc => OrderBy::CreateTimeDesc,
            pb::MemoryOrderBy::CreateTimeAsc => OrderBy::CreateTimeAsc,
            pb::MemoryOrderBy::ImportanceDesc => OrderBy::ImportanceDesc,
        };
        let f = filter(r.filter)?;
        let (memories, next_page_token) =
            self.service.list(&p, &r.namespace, f, order, r.page_size, &r.page_token, with_embedding(r.view)?).await?;
        Ok(Response::new(pb::ListMemoriesResponse {
            memories: memories.into_iter().map(memory_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn search_memories(
        &self,
        request: Request<pb::SearchMemoriesRequest>,
    ) -> Result<Response<pb::SearchMemoriesResponse>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryRead)?;
        let r = request.into_inner();
        let mode = match enum_value::<pb::SearchMode>("mode", r.mode)? {
            pb::SearchMode::Unspecified => None,
            pb::SearchMode::Semantic => Some(SearchMode::Semantic),
            pb::SearchMode::Keyword => Some(SearchMode::Keyword),
            pb::SearchMode::Hybrid => Some(SearchMode::Hybrid),
        };
        let req = SearchRequest {
            query: r.query,
            query_embedding: (!r.query_embedding.is_empty()).then_some(r.query_embedding),
            mode,
            top_k: r.top_k,
            min_score: r.min_score,
            filter: filter(r.filter)?,
            diversity: r.diversity,
            with_embedding: with_embedding(r.view)?,
            exact: r.exact,
        };
        let out = self.service.search(&p, &r.namespace, req).await?;
        Ok(Response::new(pb::SearchMemoriesResponse {
            results: out
                .hits
                .into_iter()
                .map(|h| pb::SearchResult {
                    memory: Some(memory_to_pb(h.memory)),
                    score: h.score,
                    semantic_score: h.semantic_score,
                    semantic_rank: h.semantic_rank,
                    keyword_score: h.keyword_score,
                    keyword_rank: h.keyword_rank,
                })
                .collect(),
            mode: match out.mode {
                SearchMode::Semantic => pb::SearchMode::Semantic,
                SearchMode::Keyword => pb::SearchMode::Keyword,
                SearchMode::Hybrid => pb::SearchMode::Hybrid,
            } as i32,
            embedding_model: out.embedding_model,
        }))
    }

    async fn share_memory(&self, request: Request<pb::ShareMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryWrite)?;
        let ctx = request_context(&request);
        let r = request.into_inner();
        let id = parse_id("id", &r.id)?;
        let mut grants = Vec::with_capacity(r.grant.len());
        for (i, g) in r.grant.into_iter().enumerate() {
            let permission = match enum_value::<pb::SharePermission>(&format!("grant[{i}].permission"), g.permission)? {
                pb::SharePermission::Unspecified => {
                    return Err(Error::invalid(format!("grant[{i}].permission"), "must be READ or WRITE").into());
                }
                pb::SharePermission::Read => Permission::Read,
                pb::SharePermission::Write => Permission::Write,
            };
            let expire_time = g.expire_time.map(|t| timestamp(&format!("grant[{i}].expire_time"), &t)).transpose()?;
            grants.push(Grant { agent_id: g.agent_id, permission, expire_time });
        }
        let m = self.service.share(&ctx, &p, &r.namespace, id, grants, r.revoke, etag(&r.etag)).await?;
        Ok(Response::new(memory_to_pb(m)))
    }

    async fn prune_memories(
        &self,
        request: Request<pb::PruneMemoriesRequest>,
    ) -> Result<Response<pb::PruneMemoriesResponse>, Status> {
        let p = principal(&request)?;
        let r = request.into_inner();
        // A dry run only counts.
        p.require_scope(if r.dry_run { Scope::MemoryRead } else { Scope::MemoryWrite })?;
        let older_than = r.older_than.map(|t| timestamp("older_than", &t)).transpose()?.map(|t| (t, r.max_importance));
        let (pruned_count, more) =
            self.service.prune(&p, &r.namespace, r.expired, older_than, r.limit, r.dry_run).await?;
        Ok(Response::new(pb::PruneMemoriesResponse { pruned_count, dry_run: r.dry_run, more }))
    }

    async fn get_memory_stats(
        &self,
        request: Request<pb::GetMemoryStatsRequest>,
    ) -> Result<Response<pb::MemoryStats>, Status> {
        let p = principal(&request)?;
        p.require_scope(Scope::MemoryRead)?;
        let r = request.into_inner();
        let s = self.service.stats(&p, &r.namespace).await?;
        Ok(Response::new(pb::MemoryStats {
            namespace: s.namespace,
            total_count: s.total,
            count_by_kind: s.by_kind.into_iter().collect(),
            count_by_access_level: s
                .by_access_level
                .into_iter()
                .map(|(l, n)| (access_level_to_pb(l).as_str_name().to_string(), n))
                .collect(),
            with_embedding_count: s.with_embedding,
            without_embedding_count: s.total - s.with_embedding,
            oldest_create_time: s.oldest.map(to_timestamp),
            newest_create_time: s.newest.map(to_timestamp),
            storage_bytes: s.storage_bytes,
        }))
    }
}
