//! Memories in the embedded store. (Placeholder: every call answers UNIMPLEMENTED.)
#![allow(unused_variables)]

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::SqliteStore;
use crate::{
    auth::{Principal, RequestContext},
    error::{Error, Result},
    memory::{
        Cursor, Grant, Memory, MemoryFilter, MemoryPatch, MemoryStats, NewMemory, OrderBy, PruneCriteria, ScoredMemory,
    },
    store::MemoryStore,
};

#[async_trait]
impl MemoryStore for SqliteStore {
    /// A named server secret shared by every replica; created from `generate` on first use.
    async fn secret(&self, name: &str, generate: &(dyn Fn() -> Vec<u8> + Send + Sync)) -> Result<Vec<u8>> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Makes sure the ANN index for vectors of `dim` dimensions exists.
    async fn ensure_vector_index(&self, dim: usize, m: u32, ef_construction: u32) -> Result<()> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Inserts all or nothing; items whose `request_id` was seen before return the first result.
    /// Every change below appends its audit row (from `ctx`) in the same transaction.
    async fn insert_memories(&self, p: &Principal, items: Vec<NewMemory>, ctx: &RequestContext) -> Result<Vec<Memory>> {
        Err(Error::Unimplemented("embedded store"))
    }

    async fn get_memory(&self, p: &Principal, ns: &str, id: Uuid, with_embedding: bool) -> Result<Option<Memory>> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// NOT_FOUND when invisible, PERMISSION_DENIED when visible but not writable, ABORTED on a
    /// version mismatch.
    async fn update_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        patch: &MemoryPatch,
        ctx: &RequestContext,
    ) -> Result<Memory> {
        Err(Error::Unimplemented("embedded store"))
    }

    async fn delete_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<()> {
        Err(Error::Unimplemented("embedded store"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn list_memories(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        order: OrderBy,
        after: Option<&Cursor>,
        limit: usize,
        with_embedding: bool,
    ) -> Result<Vec<Memory>> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// How many visible memories with vectors of this model match `filter`, counting at most `cap`.
    async fn count_matching(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        model: &str,
        dim: usize,
        cap: u64,
    ) -> Result<u64> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// The `k` nearest visible memories by cosine distance, best first; score = cosine similarity.
    #[allow(clippy::too_many_arguments)]
    async fn semantic_search(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        query: &[f32],
        model: &str,
        k: usize,
        max_distance: Option<f64>,
        exact: bool,
        with_embedding: bool,
    ) -> Result<Vec<ScoredMemory>> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Full-text matches, best first; score = ts_rank_cd. `dim` selects which stored vectors to
    /// return alongside (for MMR).
    #[allow(clippy::too_many_arguments)]
    async fn keyword_search(
        &self,
        p: &Principal,
        ns: &str,
        filter: &MemoryFilter,
        text: &str,
        text_config: &str,
        k: usize,
        with_embedding: bool,
        dim: usize,
    ) -> Result<Vec<ScoredMemory>> {
        Err(Error::Unimplemented("embedded store"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn share_memory(
        &self,
        p: &Principal,
        ns: &str,
        id: Uuid,
        grants: &[Grant],
        revoke: &[String],
        expected_version: Option<i64>,
        ctx: &RequestContext,
    ) -> Result<Memory> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Deletes (or counts, when dry-run) up to `limit` matching memories; returns the count and
    /// whether more remain.
    async fn prune(&self, criteria: &PruneCriteria) -> Result<(i64, bool)> {
        Err(Error::Unimplemented("embedded store"))
    }

    async fn stats(&self, p: &Principal, ns: &str) -> Result<MemoryStats> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Deletes up to `batch` expired memories; returns how many.
    async fn sweep_expired(&self, batch: usize) -> Result<u64> {
        Err(Error::Unimplemented("embedded store"))
    }

    /// Adds deferred read counts: (id, reads, last read time).
    async fn record_access(&self, counts: &[(Uuid, i64, DateTime<Utc>)]) -> Result<()> {
        Err(Error::Unimplemented("embedded store"))
    }
}
