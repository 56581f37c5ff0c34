//! The memory service: validation against the configured limits, embedding, access rules (via
//! the store), search planning and ranking, pagination, deferred read counting and expiry.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{
    AccessLevel, Cursor, Grant, Memory, MemoryFilter, MemoryPatch, MemoryStats, NewMemory, OrderBy, PruneCriteria,
    SearchColumns, SearchHit, SearchMode, cache::MemoryCache, ranking,
};
use crate::{
    auth::{Principal, RequestContext},
    config::MemoryConfig,
    embed::{EmbedError, Embedder},
    error::{Error, Result, Violations},
    page_token::PageTokens,
    store::{MemoryStore, notify::Notifier},
    telemetry::metrics::metrics,
};

/// Longest `kind`, `summary` is bounded like content.
const MAX_KIND_BYTES: usize = 128;
/// Default `top_k`.
pub const DEFAULT_TOP_K: usize = 10;

/// When a memory expires, as the caller said it.
#[derive(Debug, Clone, Copy)]
pub enum Expiry {
    At(DateTime<Utc>),
    /// A signed number of seconds (negative is rejected).
    Ttl(f64),
}

/// A memory as a caller described it, before validation.
#[derive(Debug, Clone, Default)]
pub struct MemoryDraft {
    pub content: String,
    pub summary: String,
    pub kind: String,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub importance: Option<f64>,
    pub access_level: Option<AccessLevel>,
    pub parent_id: Option<Uuid>,
    pub embedding: Option<Vec<f32>>,
    pub embedding_model: Option<String>,
    pub expiry: Option<Expiry>,
}

/// An update as a caller described it: only the named fields change.
#[derive(Debug, Clone, Default)]
pub struct PatchDraft {
    pub content: Option<String>,
    pub summary: Option<String>,
    pub kind: Option<String>,
    pub tags: Option<Vec<String>>,
    pub metadata: Option<Value>,
    pub importance: Option<f64>,
    pub access_level: Option<AccessLevel>,
    pub parent_id: Option<Option<Uuid>>,
    pub embedding: Option<Vec<f32>>,
    pub embedding_model: Option<String>,
    /// `Some(None)` clears the expiry.
    pub expiry: Option<Option<Expiry>>,
}

#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub query: String,
    pub query_embedding: Option<Vec<f32>>,
    pub mode: Option<SearchMode>,
    pub top_k: i32,
    pub min_score: Option<f64>,
    pub filter: MemoryFilter,
    pub diversity: Option<f64>,
    pub with_embedding: bool,
    pub exact: bool,
}

#[derive(Debug, Clone)]
pub struct SearchOutcome {
    pub hits: Vec<SearchHit>,
    pub mode: SearchMode,
    pub embedding_model: String,
}

/// Read counts waiting to be written in one statement.
#[derive(Default)]
struct AccessTracker {
    pending: Mutex<HashMap<Uuid, (i64, DateTime<Utc>)>>,
}

impl AccessTracker {
    fn record(&self, ids: impl IntoIterator<Item = Uuid>) {
        let now = Utc::now();
        if let Ok(mut pending) = self.pending.lock() {
            for id in ids {
                let e = pending.entry(id).or_insert((0, now));
                e.0 += 1;
                e.1 = now;
            }
        }
    }
    fn take(&self) -> Vec<(Uuid, i64, DateTime<Utc>)> {
        match self.pending.lock() {
            Ok(mut pending) => pending.drain().map(|(id, (n, t))| (id, n, t)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[derive(Clone)]
pub struct MemoryService {
    store: Arc<dyn MemoryStore>,
    embedder: Embedder,
    cfg: Arc<MemoryConfig>,
    tokens: PageTokens,
    access: Arc<AccessTracker>,
    plans: Arc<PlanChoices>,
    /// The memory read cache (GetMemory, search results); `None` when turned off or when the
    /// backend announces no memory changes (the embedded store).
    cache: Option<Arc<MemoryCache>>,
    /// How often recent searches found all their results in the cache.
    search_hits: Arc<SearchHitRate>,
}

/// How often recent searches found every result in the read cache (an exponentially weighted
/// average, 1/[`SEARCH_HIT_RATE_WINDOW`] per search, starting at 1). While it is at least
/// [`SEARCH_IDS_MIN_HIT_RATE`], searches rank ids and take rows from the cache; below it, a
/// second statement for the missing rows would be needed too often, so searches read their rows
/// at once again — and still measure, from the rows they read, whether the cache held them all,
/// and put them in the cache.
#[derive(Debug)]
struct SearchHitRate(Mutex<f64>);

const SEARCH_HIT_RATE_WINDOW: f64 = 16.0;
const SEARCH_IDS_MIN_HIT_RATE: f64 = 0.5;

impl Default for SearchHitRate {
    fn default() -> Self {
        Self(Mutex::new(1.0))
    }
}

impl SearchHitRate {
    fn get(&self) -> f64 {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, all_cached: bool) {
        let mut rate = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *rate += (if all_cached { 1.0 } else { 0.0 } - *rate) / SEARCH_HIT_RATE_WINDOW;
    }
}

/// At most this many filtered-search plan choices are remembered (past it, expired ones go,
/// then all).
const PLAN_CHOICES_REMEMBERED: usize = 4096;

/// Recent plan choices of filtered searches (exact or HNSW), by caller, namespace, model and
/// filter, each for `TMWS_EXACT_SEARCH_ESTIMATE_TTL`: estimating costs a round trip (and the
/// planning of the filter) per search, while the answer changes only as the data does. A choice
/// that went stale meanwhile still gives correct results: the exact plan is always exact, and
/// HNSW with iterative scan returns k rows when k match.
#[derive(Debug, Default)]
struct PlanChoices(std::sync::Mutex<HashMap<String, (std::time::Instant, bool)>>);

impl PlanChoices {
    fn get(&self, key: &str, ttl: Duration) -> Option<bool> {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(key).filter(|(t, _)| t.elapsed() < ttl).map(|(_, exact)| *exact)
    }

    fn put(&self, key: String, exact: bool, ttl: Duration) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= PLAN_CHOICES_REMEMBERED && !seen.contains_key(&key) {
            seen.retain(|_, (t, _)| t.elapsed() < ttl);
            if seen.len() >= PLAN_CHOICES_REMEMBERED {
                seen.clear();
            }
        }
        seen.insert(key, (std::time::Instant::now(), exact));
    }
}

/// What a List page token is bound to.
#[derive(Serialize)]
struct ListQuery<'a> {
    method: &'static str,
    agent: &'a str,
    namespace: &'a str,
    filter: &'a MemoryFilter,
    order: OrderBy,
}

impl MemoryService {
    /// Prepares the service: loads the page-token key shared by all replicas and makes sure the
    /// ANN index for the configured dimension exists.
    pub async fn new(
        store: Arc<dyn MemoryStore>,
        embedder: Embedder,
        cfg: MemoryConfig,
        notifier: &Notifier,
    ) -> anyhow::Result<Self> {
        let key = store
            .secret("page_token_key", &|| {
                let mut key = vec![0u8; 32];
                // A failure leaves zeros only if the OS has no randomness at all; refuse that below.
                let _ = getrandom::fill(&mut key);
                key
            })
            .await?;
        anyhow::ensure!(key.iter().any(|b| *b != 0), "could not generate a random page token key");
        store.ensure_vector_index(embedder.dimension(), cfg.hnsw_m, cfg.hnsw_ef_construction).await?;
        let cache = (cfg.cache_bytes > 0 && !cfg.cache_ttl.is_zero() && notifier.announces_changes()).then(|| {
            let cache = Arc::new(MemoryCache::new(cfg.cache_bytes, cfg.cache_ttl));
            // Ends when the notifier closes or the cache is dropped.
            drop(crate::store::notify::follow(&cache, notifier));
            cache
        });
        Ok(Self {
            store,
            embedder,
            cfg: Arc::new(cfg),
            tokens: PageTokens::new(&key)?,
            access: Arc::new(AccessTracker::default()),
            plans: Arc::default(),
            cache,
            search_hits: Arc::default(),
        })
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The page-token codec (its key is shared by every replica).
    pub fn page_tokens(&self) -> &PageTokens {
        &self.tokens
    }

    pub fn config(&self) -> &MemoryConfig {
        &self.cfg
    }

    // ---- validation ------------------------------------------------------------------------

    fn validate_text_fields(
        &self,
        v: &mut Violations,
        prefix: &str,
        content: Option<&str>,
        summary: Option<&str>,
        kind: Option<&str>,
    ) {
        if let Some(content) = content {
            if content.trim().is_empty() {
                v.add(format!("{prefix}content"), "must not be empty");
            } else if content.len() > self.cfg.max_content_bytes {
                v.add(format!("{prefix}content"), format!("must be at most {} bytes", self.cfg.max_content_bytes));
            }
        }
        if let Some(summary) = summary
            && summary.len() > self.cfg.max_content_bytes
        {
            v.add(format!("{prefix}summary"), format!("must be at most {} bytes", self.cfg.max_content_bytes));
        }
        if let Some(kind) = kind
            && kind.len() > MAX_KIND_BYTES
        {
            v.add(format!("{prefix}kind"), format!("must be at most {MAX_KIND_BYTES} bytes"));
        }
    }

    fn validate_tags(&self, v: &mut Violations, prefix: &str, tags: &[String]) -> Vec<String> {
        if tags.len() > self.cfg.max_tags {
            v.add(format!("{prefix}tags"), format!("at most {} tags", self.cfg.max_tags));
        }
        let mut out: Vec<String> = Vec::with_capacity(tags.len());
        for (i, tag) in tags.iter().enumerate() {
            if tag.trim().is_empty() {
                v.add(format!("{prefix}tags[{i}]"), "must not be empty");
            } else if tag.len() > self.cfg.max_tag_bytes {
                v.add(format!("{prefix}tags[{i}]"), format!("must be at most {} bytes", self.cfg.max_tag_bytes));
            } else if !out.contains(tag) {
                out.push(tag.clone());
            }
        }
        out
    }

    fn validate_metadata(&self, v: &mut Violations, field: &str, metadata: &Value) {
        if !metadata.is_object() {
            v.add(field, "must be an object");
            return;
        }
        let size = serde_json::to_vec(metadata).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.cfg.max_metadata_bytes {
            v.add(field, format!("must be at most {} bytes as JSON", self.cfg.max_metadata_bytes));
        }
        if json_depth(metadata) > self.cfg.max_metadata_depth {
            v.add(field, format!("must nest at most {} levels", self.cfg.max_metadata_depth));
        }
    }

    fn validate_importance(v: &mut Violations, field: &str, importance: f64) {
        if !importance.is_finite() || !(0.0..=1.0).contains(&importance) {
            v.add(field, "must be within 0..1");
        }
    }

    fn validate_vector(&self, v: &mut Violations, field: &str, vector: &[f32]) {
        let dim = self.embedder.dimension();
        if vector.len() != dim {
            v.add(field, format!("has {} dimensions; the model {} has {dim}", vector.len(), self.embedder.model()));
        } else if vector.iter().any(|x| !x.is_finite()) {
            v.add(field, "must not contain NaN or infinite values");
        } else if vector.iter().all(|x| *x == 0.0) {
            v.add(field, "must not be all zeros (cosine distance is undefined)");
        }
    }

    fn validate_model(&self, v: &mut Violations, field: &str, model: Option<&str>) {
        if let Some(m) = model
            && !m.is_empty()
            && m != self.embedder.model()
        {
            v.add(field, format!("this server stores vectors of model {:?} only", self.embedder.model()));
        }
    }

    fn resolve_expiry(&self, v: &mut Violations, prefix: &str, expiry: Expiry) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let max = chrono::Duration::from_std(self.cfg.max_ttl).unwrap_or(chrono::Duration::MAX);
        match expiry {
            Expiry::Ttl(secs) => {
                if !secs.is_finite() || secs <= 0.0 {
                    v.add(format!("{prefix}ttl"), "must be positive");
                    return None;
                }
                let ttl = chrono::Duration::milliseconds((secs * 1000.0).min(i64::MAX as f64 / 2.0) as i64);
                if ttl > max {
                    v.add(format!("{prefix}ttl"), format!("must be at most {:?}", self.cfg.max_ttl));
                    return None;
                }
                Some(now + ttl)
            }
            Expiry::At(t) => {
                if t - now > max {
                    v.add(format!("{prefix}expire_time"), format!("must be within {:?} from now", self.cfg.max_ttl));
                    return None;
                }
                Some(t)
            }
        }
    }

    /// Validates a draft (all problems at once) and returns the memory to insert, without vector
    /// when the server must compute it.
    fn validate_draft(
        &self,
        p: &Principal,
        ns: &str,
        prefix: &str,
        d: MemoryDraft,
        request_id: Option<String>,
        v: &mut Violations,
    ) -> NewMemory {
        self.validate_text_fields(v, prefix, Some(&d.content), Some(&d.summary), Some(&d.kind));
        let tags = self.validate_tags(v, prefix, &d.tags);
        let metadata = d.metadata.unwrap_or_else(|| Value::Object(Default::default()));
        self.validate_metadata(v, &format!("{prefix}metadata"), &metadata);
        let importance = d.importance.unwrap_or(0.5);
        Self::validate_importance(v, &format!("{prefix}importance"), importance);
        if let Some(e) = &d.embedding {
            self.validate_vector(v, &format!("{prefix}embedding"), e);
        }
        self.validate_model(v, &format!("{prefix}embedding_model"), d.embedding_model.as_deref());
        let expire_time = d.expiry.and_then(|e| self.resolve_expiry(v, prefix, e));
        if let Some(r) = &request_id
            && r.len() > 128
        {
            v.add("request_id", "must be at most 128 bytes");
        }
        NewMemory {
            id: Uuid::now_v7(),
            namespace: ns.to_string(),
            owner: p.agent_id.clone(),
            content: d.content,
            summary: d.summary,
            kind: d.kind,
            tags,
            metadata,
            importance,
            access_level: d.access_level.unwrap_or(AccessLevel::Private),
            parent_id: d.parent_id,
            embedding: d.embedding,
            embedding_model: Some(self.embedder.model().to_string()),
            expire_time,
            request_id: request_id.filter(|r| !r.is_empty()),
        }
    }

    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embedder.embed(texts).await.map_err(|e| match e {
            EmbedError::Disabled => Error::invalid(
                "memory.embedding",
                "required: this server has no embedding provider (TMWS_EMBEDDING_PROVIDER=none)",
            ),
            other => Error::Unavailable(other.to_string()),
        })
    }

    // ---- operations --------------------------------------------------------------------------

    /// Creates memories on the server's own behalf (audited with method `internal`); calls
    /// from clients use [`MemoryService::create_for`].
    pub async fn create(
        &self,
        p: &Principal,
        requested_ns: &str,
        items: Vec<(String, MemoryDraft, Option<String>)>,
    ) -> Result<Vec<Memory>> {
        let ctx = RequestContext { method: "internal".into(), ..RequestContext::default() };
        self.create_for(&ctx, p, requested_ns, items).await
    }

    /// Creates memories, all or nothing. `items` are (field prefix, draft, request id); the
    /// audit rows carry `ctx`.
    pub async fn create_for(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        requested_ns: &str,
        items: Vec<(String, MemoryDraft, Option<String>)>,
    ) -> Result<Vec<Memory>> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        if items.is_empty() {
            return Err(Error::invalid("requests", "at least one memory is required"));
        }
        if items.len() > self.cfg.max_batch_size {
            return Err(Error::invalid("requests", format!("at most {} memories per batch", self.cfg.max_batch_size)));
        }
        let mut v = Violations::default();
        let mut news = Vec::with_capacity(items.len());
        for (prefix, draft, request_id) in items {
            if draft.access_level == Some(AccessLevel::System) && !p.is_admin() {
                return Err(Error::PermissionDenied("only admins may create SYSTEM memories".into()));
            }
            news.push(self.validate_draft(p, &ns, &prefix, draft, request_id, &mut v));
        }
        v.into_result()?;
        // Compute the missing vectors in provider batches; any failure fails the whole call
        // before anything is written.
        let missing: Vec<usize> =
            news.iter().enumerate().filter(|(_, n)| n.embedding.is_none()).map(|(i, _)| i).collect();
        if !missing.is_empty() {
            let texts: Vec<&str> = missing.iter().map(|&i| news[i].content.as_str()).collect();
            let vectors = self.embed(&texts).await?;
            if vectors.len() != missing.len() {
                return Err(Error::Unavailable("embedding provider returned the wrong number of vectors".into()));
            }
            for (i, vector) in missing.into_iter().zip(vectors) {
                news[i].embedding = Some(vector);
            }
        }
        self.store.insert_memories(p, news, ctx).await
    }

    pub async fn get(&self, p: &Principal, requested_ns: &str, id: Uuid, with_embedding: bool) -> Result<Memory> {
        let ns = p.target_namespace(requested_ns)?;
        // Vectors are not cached (FULL view reads the row).
        let cache = self.cache.as_deref().filter(|_| !with_embedding);
        if let Some(cache) = cache {
            let hit = cache.get_visible(p, &ns, id, Utc::now());
            metrics().memory_cache_lookup(hit.is_some());
            if let Some(hit) = hit {
                self.access.record([id]);
                return Ok(Memory::clone(&hit));
            }
        }
        // A miss, or an entry this caller may not see: the store decides.
        let epoch = cache.and_then(MemoryCache::epoch);
        let memory = self
            .store
            .get_memory(p, &ns, id, with_embedding)
            .await?
            .ok_or_else(|| Error::not_found("memory", id.to_string()))?;
        if let (Some(cache), Some(epoch)) = (cache, epoch) {
            cache.insert(epoch, memory.clone());
        }
        self.access.record([memory.id]);
        Ok(memory)
    }

    /// Drops cached copies of memories this replica just wrote (or may have: called whatever
    /// the write's outcome), so that its callers read their own writes at once; other replicas
    /// hear of the change through `tmws_memory`.
    fn forget<T>(&self, ids: &[Uuid], outcome: Result<T>) -> Result<T> {
        if let Some(cache) = &self.cache {
            cache.invalidate(ids);
        }
        outcome
    }

    fn forget_all<T>(&self, outcome: Result<T>) -> Result<T> {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
        outcome
    }

    pub async fn update(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        requested_ns: &str,
        id: Uuid,
        d: PatchDraft,
        etag: Option<&str>,
    ) -> Result<Memory> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        let prefix = "memory.";
        self.validate_text_fields(&mut v, prefix, d.content.as_deref(), d.summary.as_deref(), d.kind.as_deref());
        let tags = d.tags.as_ref().map(|t| self.validate_tags(&mut v, prefix, t));
        if let Some(m) = &d.metadata {
            self.validate_metadata(&mut v, "memory.metadata", m);
        }
        if let Some(i) = d.importance {
            Self::validate_importance(&mut v, "memory.importance", i);
        }
        if let Some(e) = &d.embedding {
            self.validate_vector(&mut v, "memory.embedding", e);
        }
        self.validate_model(&mut v, "memory.embedding_model", d.embedding_model.as_deref());
        let expire_time = match d.expiry {
            None => None,
            Some(None) => Some(None),
            Some(Some(e)) => Some(self.resolve_expiry(&mut v, prefix, e)),
        };
        v.into_result()?;
        let mut patch = MemoryPatch {
            content: d.content,
            summary: d.summary,
            kind: d.kind,
            tags,
            metadata: d.metadata,
            importance: d.importance,
            access_level: d.access_level,
            parent_id: d.parent_id,
            embedding: d.embedding.map(|e| (e, self.embedder.model().to_string())),
            expire_time,
        };
        if patch.is_empty() {
            return Err(Error::invalid("update_mask", "names no field to update"));
        }
        // New content gets a new vector unless the caller sent one.
        if patch.embedding.is_none()
            && let Some(content) = &patch.content
            && self.embedder.can_embed()
        {
            let mut vectors = self.embed(&[content.as_str()]).await?;
            let vector =
                vectors.pop().ok_or_else(|| Error::Unavailable("embedding provider returned no vector".into()))?;
            patch.embedding = Some((vector, self.embedder.model().to_string()));
        }
        let outcome = self.store.update_memory(p, &ns, id, etag.map(parse_etag), &patch, ctx).await;
        self.forget(&[id], outcome)
    }

    pub async fn delete(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        requested_ns: &str,
        id: Uuid,
        etag: Option<&str>,
    ) -> Result<()> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let outcome = self.store.delete_memory(p, &ns, id, etag.map(parse_etag), ctx).await;
        self.forget(&[id], outcome)
    }

    fn page_size(&self, requested: i32) -> Result<usize> {
        if requested < 0 {
            return Err(Error::invalid("page_size", "must not be negative"));
        }
        Ok(if requested == 0 { self.cfg.default_page_size } else { (requested as usize).min(self.cfg.max_page_size) })
    }

    /// One page of memories and the token of the next (empty at the end).
    #[allow(clippy::too_many_arguments)]
    pub async fn list(
        &self,
        p: &Principal,
        requested_ns: &str,
        filter: MemoryFilter,
        order: OrderBy,
        page_size: i32,
        page_token: &str,
        with_embedding: bool,
    ) -> Result<(Vec<Memory>, String)> {
        let ns = p.target_namespace(requested_ns)?;
        let limit = self.page_size(page_size)?;
        self.validate_filter(&filter)?;
        let query = ListQuery { method: "ListMemories", agent: &p.agent_id, namespace: &ns, filter: &filter, order };
        let after: Option<Cursor> =
            if page_token.is_empty() { None } else { Some(self.tokens.decode(page_token, &query)?) };
        let mut rows =
            self.store.list_memories(p, &ns, &filter, order, after.as_ref(), limit + 1, with_embedding).await?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            match rows.last() {
                Some(last) => {
                    let cursor = match order {
                        OrderBy::ImportanceDesc => Cursor::Importance(last.importance, last.id),
                        _ => Cursor::CreateTime(last.create_time.timestamp_micros(), last.id),
                    };
                    self.tokens.encode(&query, &cursor)
                }
                None => String::new(),
            }
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    fn validate_filter(&self, f: &MemoryFilter) -> Result<()> {
        let mut v = Violations::default();
        for (name, value) in [("filter.min_importance", f.min_importance), ("filter.max_importance", f.max_importance)]
        {
            if let Some(x) = value {
                Self::validate_importance(&mut v, name, x);
            }
        }
        if let (Some(lo), Some(hi)) = (f.min_importance, f.max_importance)
            && lo > hi
        {
            v.add("filter.min_importance", "must not exceed max_importance");
        }
        for (name, list) in [
            ("filter.tags_any", &f.tags_any),
            ("filter.tags_all", &f.tags_all),
            ("filter.kinds", &f.kinds),
            ("filter.owners", &f.owners),
        ] {
            if list.len() > 1000 {
                v.add(name, "at most 1000 values");
            }
        }
        if let Some(m) = &f.metadata_equals {
            self.validate_metadata(&mut v, "filter.metadata_equals", m);
        }
        v.into_result()
    }

    pub async fn search(&self, p: &Principal, requested_ns: &str, r: SearchRequest) -> Result<SearchOutcome> {
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        if r.top_k < 0 {
            v.add("top_k", "must not be negative");
        }
        if let Some(s) = r.min_score
            && !s.is_finite()
        {
            v.add("min_score", "must be a finite number");
        }
        if let Some(d) = r.diversity
            && (!d.is_finite() || !(0.0..=1.0).contains(&d))
        {
            v.add("diversity", "must be within 0..1");
        }
        if let Some(e) = &r.query_embedding {
            self.validate_vector(&mut v, "query_embedding", e);
        }
        if r.query.len() > self.cfg.max_content_bytes {
            v.add("query", format!("must be at most {} bytes", self.cfg.max_content_bytes));
        }
        let has_text = !r.query.trim().is_empty();
        if !has_text && r.query_embedding.is_none() {
            v.add("query", "a query text or a query_embedding is required");
        }
        let mode = match r.mode {
            Some(m) => m,
            None if has_text && (r.query_embedding.is_some() || self.embedder.can_embed()) => SearchMode::Hybrid,
            None if has_text => SearchMode::Keyword,
            None => SearchMode::Semantic,
        };
        if matches!(mode, SearchMode::Keyword | SearchMode::Hybrid) && !has_text && r.query_embedding.is_some() {
            v.add("query", "keyword and hybrid search need a query text");
        }
        if matches!(mode, SearchMode::Semantic | SearchMode::Hybrid)
            && r.query_embedding.is_none()
            && !self.embedder.can_embed()
        {
            v.add("query_embedding", "required: this server has no embedding provider");
        }
        v.into_result()?;
        self.validate_filter(&r.filter)?;

        let k = if r.top_k == 0 { DEFAULT_TOP_K } else { (r.top_k as usize).min(self.cfg.max_top_k) };
        let diversity = r.diversity.unwrap_or(0.0);
        let candidates = if diversity > 0.0 || mode == SearchMode::Hybrid { (k * 4).clamp(40, 400) } else { k };
        let mut columns = SearchColumns::needed(r.with_embedding, diversity);
        // With the read cache on (and holding what searches find), the statements rank ids and
        // the memories come from the cache, the ones it lacks from one more statement: rows are
        // read and decoded only for the k results, and not at all for the ones cached.
        let cache = self.cache.as_deref().filter(|_| columns == SearchColumns::Rows);
        let epoch = cache.and_then(MemoryCache::epoch);
        if cache.is_some() && self.search_hits.get() >= SEARCH_IDS_MIN_HIT_RATE {
            columns = SearchColumns::Ids;
        }

        let query_vector = match (&r.query_embedding, mode) {
            (_, SearchMode::Keyword) => None,
            (Some(e), _) => Some(e.clone()),
            (None, _) => {
                let mut vectors = self.embed(&[r.query.as_str()]).await?;
                Some(vectors.pop().ok_or_else(|| Error::Unavailable("embedding provider returned no vector".into()))?)
            }
        };
        let model = self.embedder.model().to_string();

        // Hybrid search runs its two candidate statements at once, on two connections.
        let semantic = async {
            let Some(q) = &query_vector else { return Ok(Vec::new()) };
            let exact = r.exact || self.prefer_exact(p, &ns, &r.filter, &model).await?;
            let max_distance = match (mode, r.min_score) {
                (SearchMode::Semantic, Some(s)) => Some(1.0 - s),
                _ => None,
            };
            self.store.semantic_search(p, &ns, &r.filter, q, &model, candidates, max_distance, exact, columns).await
        };
        let keyword = async {
            if mode == SearchMode::Semantic {
                return Ok(Vec::new());
            }
            let mut list = self
                .store
                .keyword_search(
                    p,
                    &ns,
                    &r.filter,
                    &r.query,
                    &self.cfg.text_search_config,
                    candidates,
                    columns,
                    self.embedder.dimension(),
                )
                .await?;
            if let (SearchMode::Keyword, Some(s)) = (mode, r.min_score) {
                list.retain(|h| h.score >= s);
            }
            Ok::<_, Error>(list)
        };
        let (semantic, keyword) = tokio::try_join!(semantic, keyword)?;

        let fused = match mode {
            SearchMode::Semantic => ranking::single_list(semantic, true),
            SearchMode::Keyword => ranking::single_list(keyword, false),
            SearchMode::Hybrid => {
                let mut fused = ranking::reciprocal_rank_fusion(semantic, keyword);
                if let Some(s) = r.min_score {
                    fused.retain(|(h, _)| h.score >= s);
                }
                fused
            }
        };
        let mut hits = ranking::mmr(fused, k, diversity);
        if let Some(cache) = cache {
            if columns == SearchColumns::Ids {
                let all_cached;
                (hits, all_cached) = self.fill_hits(p, &ns, hits, cache).await?;
                self.search_hits.record(all_cached);
            } else {
                let now = Utc::now();
                let all_cached = hits.iter().all(|h| cache.get_visible(p, &ns, h.memory.id, now).is_some());
                self.search_hits.record(all_cached);
                if let Some(epoch) = epoch {
                    for h in &hits {
                        cache.insert(epoch, h.memory.clone());
                    }
                }
            }
        }
        self.access.record(hits.iter().map(|h| h.memory.id));
        Ok(SearchOutcome { hits, mode, embedding_model: model })
    }

    /// Replaces the placeholders of a search that ranked ids ([`SearchColumns::Ids`]) by the
    /// memories: from the read cache where it holds them and the caller may see them, the rest in
    /// one statement (which applies the access rules again and fills the cache). A hit whose
    /// memory was deleted or hidden since it was ranked is left out. Also tells whether the cache
    /// held them all.
    async fn fill_hits(
        &self,
        p: &Principal,
        ns: &str,
        mut hits: Vec<SearchHit>,
        cache: &MemoryCache,
    ) -> Result<(Vec<SearchHit>, bool)> {
        let now = Utc::now();
        let mut missing = Vec::new();
        let mut cached = Vec::with_capacity(hits.len());
        for hit in &mut hits {
            let entry = cache.get_visible(p, ns, hit.memory.id, now);
            metrics().memory_cache_lookup(entry.is_some());
            cached.push(entry.is_some());
            match entry {
                Some(m) => hit.memory = Memory::clone(&m),
                None => missing.push(hit.memory.id),
            }
        }
        if missing.is_empty() {
            return Ok((hits, true));
        }
        let epoch = cache.epoch();
        let mut found: HashMap<Uuid, Memory> =
            self.store.get_memories(p, ns, &missing).await?.into_iter().map(|m| (m.id, m)).collect();
        if let Some(epoch) = epoch {
            for m in found.values() {
                cache.insert(epoch, m.clone());
            }
        }
        let mut cached = cached.into_iter();
        hits.retain_mut(|hit| {
            if cached.next().unwrap_or(false) {
                return true;
            }
            match found.remove(&hit.memory.id) {
                Some(m) => {
                    hit.memory = m;
                    true
                }
                None => false,
            }
        });
        Ok((hits, false))
    }

    /// A filter matching few rows is answered exactly: the HNSW graph would have to be walked far
    /// to find k matches (and may miss some), while prefiltering and sorting a few thousand rows
    /// is fast and has recall 1.
    async fn prefer_exact(&self, p: &Principal, ns: &str, filter: &MemoryFilter, model: &str) -> Result<bool> {
        let threshold = self.cfg.exact_search_threshold;
        if filter.is_empty() || threshold == 0 {
            return Ok(false);
        }
        let ttl = self.cfg.exact_search_estimate_ttl;
        let key = if ttl.is_zero() {
            None
        } else {
            let filter = serde_json::to_string(filter).map_err(|e| Error::internal(format!("filter key: {e}")))?;
            Some(format!("{}\u{1f}{}\u{1f}{:?}\u{1f}{ns}\u{1f}{model}\u{1f}{filter}", p.agent_id, p.namespace, p.role))
        };
        if let Some(exact) = key.as_deref().and_then(|k| self.plans.get(k, ttl)) {
            return Ok(exact);
        }
        let n = self.store.count_matching(p, ns, filter, model, self.embedder.dimension(), threshold).await?;
        let exact = n < threshold;
        if let Some(key) = key {
            self.plans.put(key, exact, ttl);
        }
        Ok(exact)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn share(
        &self,
        ctx: &RequestContext,
        p: &Principal,
        requested_ns: &str,
        id: Uuid,
        grants: Vec<Grant>,
        revoke: Vec<String>,
        etag: Option<&str>,
    ) -> Result<Memory> {
        p.ensure_can_write()?;
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        if grants.is_empty() && revoke.is_empty() {
            v.add("grant", "give at least one grant or revoke");
        }
        if grants.len() + revoke.len() > 1000 {
            v.add("grant", "at most 1000 grants and revokes per call");
        }
        let now = Utc::now();
        for (i, g) in grants.iter().enumerate() {
            if !crate::config::is_valid_identifier(&g.agent_id) {
                v.add(format!("grant[{i}].agent_id"), "must be 1-128 characters of [A-Za-z0-9._:@-]");
            }
            if g.agent_id == p.agent_id {
                v.add(format!("grant[{i}].agent_id"), "cannot grant to yourself");
            }
            if let Some(t) = g.expire_time
                && t <= now
            {
                v.add(format!("grant[{i}].expire_time"), "must be in the future");
            }
            if revoke.contains(&g.agent_id) {
                v.add(format!("grant[{i}].agent_id"), "is also revoked in the same call");
            }
        }
        for (i, r) in revoke.iter().enumerate() {
            if !crate::config::is_valid_identifier(r) {
                v.add(format!("revoke[{i}]"), "must be 1-128 characters of [A-Za-z0-9._:@-]");
            }
        }
        v.into_result()?;
        let outcome = self.store.share_memory(p, &ns, id, &grants, &revoke, etag.map(parse_etag), ctx).await;
        self.forget(&[id], outcome)
    }

    /// Deletes (or counts) expired and/or old unimportant memories of one namespace. Non-admins
    /// prune only their own memories.
    pub async fn prune(
        &self,
        p: &Principal,
        requested_ns: &str,
        expired: bool,
        older_than: Option<(DateTime<Utc>, Option<f64>)>,
        limit: i32,
        dry_run: bool,
    ) -> Result<(i64, bool)> {
        if !dry_run {
            p.ensure_can_write()?;
        }
        let ns = p.target_namespace(requested_ns)?;
        let mut v = Violations::default();
        if limit < 0 {
            v.add("limit", "must not be negative");
        }
        if !expired && older_than.is_none() {
            v.add("expired", "set expired and/or older_than");
        }
        let older_than = match older_than {
            None => None,
            Some((_, None)) => {
                v.add("max_importance", "required with older_than");
                None
            }
            Some((t, Some(i))) => {
                Self::validate_importance(&mut v, "max_importance", i);
                Some((t, i))
            }
        };
        v.into_result()?;
        let cap = self.cfg.prune_max_per_call;
        let limit = if limit == 0 { cap } else { (limit as usize).min(cap) };
        let criteria = PruneCriteria {
            namespace: ns,
            owner: if p.is_admin() { None } else { Some(p.agent_id.clone()) },
            expired,
            older_than,
            limit,
            dry_run,
        };
        let outcome = self.store.prune(&criteria).await;
        if dry_run { outcome } else { self.forget_all(outcome) }
    }

    pub async fn stats(&self, p: &Principal, requested_ns: &str) -> Result<MemoryStats> {
        let ns = p.target_namespace(requested_ns)?;
        self.store.stats(p, &ns).await
    }

    /// Writes the deferred read counts now.
    pub async fn flush_access_counts(&self) -> Result<()> {
        let counts = self.access.take();
        if counts.is_empty() {
            return Ok(());
        }
        let result = self.store.record_access(&counts).await;
        if result.is_err() {
            // Put them back so the next flush retries.
            if let Ok(mut pending) = self.access.pending.lock() {
                for (id, n, t) in counts {
                    let e = pending.entry(id).or_insert((0, t));
                    e.0 += n;
                }
            }
        }
        result
    }

    /// Deletes expired memories in bounded batches until none remain.
    pub async fn sweep_expired(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.store.sweep_expired(self.cfg.sweep_batch).await?;
            total += n;
            if (n as usize) < self.cfg.sweep_batch {
                return Ok(total);
            }
        }
    }

    /// Background upkeep: flushes read counts every second and sweeps expired memories every
    /// `TMWS_SWEEP_INTERVAL`, until `stop` turns true (then flushes once more).
    pub fn spawn_background(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut flush = tokio::time::interval(Duration::from_secs(1));
            let mut sweep = tokio::time::interval(this.cfg.sweep_interval);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = flush.tick() => {
                        if let Err(e) = this.flush_access_counts().await {
                            tracing::warn!(error = %e, "could not record memory reads");
                        }
                    }
                    _ = sweep.tick() => {
                        match this.sweep_expired().await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "swept expired memories"),
                            Err(e) => tracing::warn!(error = %e, "expired-memory sweep failed"),
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            if let Err(e) = this.flush_access_counts().await {
                tracing::warn!(error = %e, "could not record memory reads at shutdown");
            }
        })
    }
}

/// Parses an etag made by [`super::etag_of`]; anything else can never match (ABORTED).
fn parse_etag(etag: &str) -> i64 {
    etag.strip_prefix('v').and_then(|v| v.parse().ok()).unwrap_or(-1)
}

fn json_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_containers() {
        assert_eq!(json_depth(&serde_json::json!({})), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": {"b": [1]}})), 3);
        assert_eq!(json_depth(&serde_json::json!(3)), 0);
    }

    #[test]
    fn plan_choices_expire_and_stay_bounded() {
        let plans = PlanChoices::default();
        let ttl = Duration::from_millis(50);
        assert_eq!(plans.get("a", ttl), None);
        plans.put("a".into(), true, ttl);
        plans.put("b".into(), false, ttl);
        assert_eq!((plans.get("a", ttl), plans.get("b", ttl)), (Some(true), Some(false)));
        plans.put("a".into(), false, ttl);
        assert_eq!(plans.get("a", ttl), Some(false), "a new choice replaces the old");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(plans.get("a", ttl), None, "expired");
        // Full of fresh choices: a new key makes room by starting over.
        let long = Duration::from_secs(60);
        for i in 0..PLAN_CHOICES_REMEMBERED {
            plans.put(format!("k{i}"), true, long);
        }
        plans.put("new".into(), true, long);
        let held = plans.0.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert!(held <= PLAN_CHOICES_REMEMBERED, "{held} held");
        assert_eq!(plans.get("new", long), Some(true));
    }

    #[test]
    fn etags_parse() {
        assert_eq!(parse_etag("v7"), 7);
        assert_eq!(parse_etag("7"), -1);
        assert_eq!(parse_etag("vx"), -1);
    }
}
