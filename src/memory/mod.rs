//! The memory domain: the resource, its rules and validation, search ranking. No tonic, no SQL.

pub mod cache;
pub mod ranking;
pub mod service;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use service::MemoryService;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(i16)]
pub enum AccessLevel {
    Private = 1,
    Team = 2,
    Shared = 3,
    Public = 4,
    System = 5,
}

impl AccessLevel {
    pub fn from_i16(v: i16) -> Option<Self> {
        Some(match v {
            1 => Self::Private,
            2 => Self::Team,
            3 => Self::Shared,
            4 => Self::Public,
            5 => Self::System,
            _ => return None,
        })
    }
    pub fn as_i16(self) -> i16 {
        self as i16
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(i16)]
pub enum Permission {
    Read = 1,
    Write = 2,
}

impl Permission {
    pub fn from_i16(v: i16) -> Option<Self> {
        match v {
            1 => Some(Self::Read),
            2 => Some(Self::Write),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub agent_id: String,
    pub permission: Permission,
    pub expire_time: Option<DateTime<Utc>>,
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub id: Uuid,
    pub namespace: String,
    pub owner: String,
    pub content: String,
    pub summary: String,
    pub kind: String,
    pub tags: Vec<String>,
    /// Always a JSON object.
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub access_level: AccessLevel,
    pub grants: Vec<Grant>,
    pub parent_id: Option<Uuid>,
    pub embedding_model: Option<String>,
    pub embedding_dim: Option<i32>,
    /// Present only when the caller asked for it.
    pub embedding: Option<Vec<f32>>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    pub access_count: i64,
    pub last_access_time: Option<DateTime<Utc>>,
    pub version: i64,
}

impl Memory {
    /// A stand-in holding only `id`, for a search that ranked ids ([`SearchColumns::Ids`]);
    /// never answered to a client.
    pub fn placeholder(id: Uuid) -> Self {
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        Self {
            id,
            namespace: String::new(),
            owner: String::new(),
            content: String::new(),
            summary: String::new(),
            kind: String::new(),
            tags: Vec::new(),
            metadata: serde_json::Value::Null,
            importance: 0.0,
            access_level: AccessLevel::Private,
            grants: Vec::new(),
            parent_id: None,
            embedding_model: None,
            embedding_dim: None,
            embedding: None,
            create_time: epoch,
            update_time: epoch,
            expire_time: None,
            access_count: 0,
            last_access_time: None,
            version: 0,
        }
    }

    /// The opaque etag of this version (AIP-154).
    pub fn etag(&self) -> String {
        etag_of(self.version)
    }
}

pub fn etag_of(version: i64) -> String {
    format!("v{version}")
}

/// A validated memory to insert; the embedding is already computed or supplied.
#[derive(Debug, Clone)]
pub struct NewMemory {
    pub id: Uuid,
    pub namespace: String,
    pub owner: String,
    pub content: String,
    pub summary: String,
    pub kind: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub access_level: AccessLevel,
    pub parent_id: Option<Uuid>,
    pub embedding: Option<Vec<f32>>,
    pub embedding_model: Option<String>,
    pub expire_time: Option<DateTime<Utc>>,
    /// Idempotency key, scoped to (namespace, owner).
    pub request_id: Option<String>,
}

/// A validated partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct MemoryPatch {
    pub content: Option<String>,
    pub summary: Option<String>,
    pub kind: Option<String>,
    pub tags: Option<Vec<String>>,
    pub metadata: Option<serde_json::Value>,
    pub importance: Option<f64>,
    pub access_level: Option<AccessLevel>,
    /// `Some(None)` clears the parent.
    pub parent_id: Option<Option<Uuid>>,
    /// `Some((vector, model))` replaces the embedding.
    pub embedding: Option<(Vec<f32>, String)>,
    /// `Some(None)` clears the expiry.
    pub expire_time: Option<Option<DateTime<Utc>>>,
}

impl MemoryPatch {
    pub fn is_empty(&self) -> bool {
        self.content.is_none()
            && self.summary.is_none()
            && self.kind.is_none()
            && self.tags.is_none()
            && self.metadata.is_none()
            && self.importance.is_none()
            && self.access_level.is_none()
            && self.parent_id.is_none()
            && self.embedding.is_none()
            && self.expire_time.is_none()
    }
}

/// The structured filter of List, Search and Prune. Empty vectors mean "no constraint".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemoryFilter {
    pub tags_any: Vec<String>,
    pub tags_all: Vec<String>,
    pub kinds: Vec<String>,
    pub owners: Vec<String>,
    pub access_levels: Vec<AccessLevel>,
    pub min_importance: Option<f64>,
    pub max_importance: Option<f64>,
    pub create_time_after: Option<DateTime<Utc>>,
    pub create_time_before: Option<DateTime<Utc>>,
    /// Top-level metadata keys that must equal these values (a JSON object).
    pub metadata_equals: Option<serde_json::Value>,
    pub parent_id: Option<Uuid>,
}

impl MemoryFilter {
    pub fn is_empty(&self) -> bool {
        *self == MemoryFilter::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OrderBy {
    CreateTimeDesc,
    CreateTimeAsc,
    ImportanceDesc,
}

/// The position after the last row of a page, for keyset pagination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cursor {
    /// create_time in microseconds since the epoch, then id.
    CreateTime(i64, Uuid),
    /// importance, then id.
    Importance(f64, Uuid),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SearchMode {
    Semantic,
    Keyword,
    Hybrid,
}

/// What a search statement returns for each row it ranks. A 384-dimension vector is 1.5 kB per
/// row to read, send and decode, and only MMR re-ranking (`diversity`) and `with_embedding` use
/// it; the row itself is not needed when the caller takes memories from its read cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchColumns {
    /// The id and the score only: each [`ScoredMemory::memory`] is a [`Memory::placeholder`]
    /// that the caller replaces (from its read cache, else by [`crate::store::MemoryStore::get_memories`]).
    /// A backend may return the whole row instead.
    Ids,
    /// The memory without vectors.
    Rows,
    /// The memory, and its vector in [`ScoredMemory::vector`], for MMR.
    Ranking,
    /// The memory with its `embedding`, and the vector in [`ScoredMemory::vector`].
    Embedding,
}

impl SearchColumns {
    /// What a search needs: the memory's embedding when asked for, else vectors only for MMR.
    pub fn needed(with_embedding: bool, diversity: f64) -> Self {
        if with_embedding {
            Self::Embedding
        } else if diversity > 0.0 {
            Self::Ranking
        } else {
            Self::Rows
        }
    }

    /// Whether the statement returns stored vectors.
    pub fn vectors(self) -> bool {
        matches!(self, Self::Ranking | Self::Embedding)
    }
}

/// One hit of one search list before fusion.
#[derive(Debug, Clone)]
pub struct ScoredMemory {
    pub memory: Memory,
    /// Cosine similarity (semantic) or ts_rank_cd (keyword).
    pub score: f64,
    /// The stored vector, for MMR re-ranking, when the search asked for it ([`SearchColumns`]).
    pub vector: Option<Vec<f32>>,
}

/// A final search result.
#[derive(Debug, Clone)]
pub struct SearchHit {
    pub memory: Memory,
    pub score: f64,
    pub semantic_score: Option<f64>,
    pub semantic_rank: Option<i32>,
    pub keyword_score: Option<f64>,
    pub keyword_rank: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStats {
    pub namespace: String,
    pub total: i64,
    pub by_kind: Vec<(String, i64)>,
    pub by_access_level: Vec<(AccessLevel, i64)>,
    pub with_embedding: i64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    pub storage_bytes: i64,
}

/// What PruneMemories removes.
#[derive(Debug, Clone)]
pub struct PruneCriteria {
    pub namespace: String,
    /// Only this owner's memories (non-admin callers); `None` = the whole namespace.
    pub owner: Option<String>,
    pub expired: bool,
    /// Created before this time with importance at most `max_importance`.
    pub older_than: Option<(DateTime<Utc>, f64)>,
    pub limit: usize,
    pub dry_run: bool,
}

/// A plain stored memory for unit tests: `owner`'s, in `namespace`, at `level`, no grants.
#[cfg(test)]
pub(crate) fn test_memory(id: Uuid, owner: &str, namespace: &str, level: AccessLevel) -> Memory {
    let now = Utc::now();
    Memory {
        id,
        namespace: namespace.into(),
        owner: owner.into(),
        content: format!("memory {id}"),
        summary: String::new(),
        kind: String::new(),
        tags: vec![],
        metadata: serde_json::json!({}),
        importance: 0.5,
        access_level: level,
        grants: vec![],
        parent_id: None,
        embedding_model: None,
        embedding_dim: None,
        embedding: None,
        create_time: now,
        update_time: now,
        expire_time: None,
        access_count: 0,
        last_access_time: None,
        version: 1,
    }
}
