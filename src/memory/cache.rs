//! The memory read cache (PostgreSQL backend): GetMemory, and the results of searches.
//!
//! A hot memory is read from PostgreSQL once per `TMWS_MEMORY_CACHE_TTL` instead of on every
//! call. Entries are the stored memory as the store returns it (without its vector), shared by
//! every caller: whether a caller may see an entry is decided again on each hit by
//! [`visible_to`], the same rule as the store's SQL.
//!
//! Freshness:
//! - Every change to a memory or to its grants is announced by PostgreSQL triggers (migration
//!   0012) on `tmws_memory`, whoever makes it; each replica drops those entries when the
//!   announcement arrives (normally well under a millisecond after the commit).
//! - This replica's own writes drop their entries before they answer, so a caller reads its own
//!   writes on the same replica at once.
//! - A read that started before a change cannot put what it read into the cache after the
//!   change was announced: every drop advances an epoch, and a read only stores its row if the
//!   epoch is still the one it saw before reading.
//! - While changes are not being announced (the listening connection is lost) the cache is
//!   empty and stores nothing; it is emptied again once listening resumes.
//! - Entries expire after the TTL whatever happens, which also bounds how late the read counts
//!   (`access_count`, `last_access_time`, kept outside the row) can be.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{AccessLevel, Memory};
use crate::{
    auth::Principal,
    store::notify::{Change, ChangeSink, Gate},
};

/// Whether `p`, addressing `target_ns`, may read `m` at `now`: the store's visibility rule
/// (`push_visible` in src/store/memory.rs) in memory.
pub fn visible_to(p: &Principal, target_ns: &str, m: &Memory, now: DateTime<Utc>) -> bool {
    if m.expire_time.is_some_and(|t| t <= now) {
        return false;
    }
    m.owner == p.agent_id
        || (m.access_level == AccessLevel::Team && m.namespace == p.namespace)
        || matches!(m.access_level, AccessLevel::Public | AccessLevel::System)
        || (m.access_level == AccessLevel::Shared
            && m.grants.iter().any(|g| g.agent_id == p.agent_id && g.expire_time.is_none_or(|t| t > now)))
        || (p.is_admin() && m.namespace == target_ns)
}

#[derive(Debug)]
struct Entry {
    memory: Arc<Memory>,
    stored: Instant,
    cost: usize,
    seq: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Open while changes are announced; advanced by every drop.
    gate: Gate,
    entries: HashMap<Uuid, Entry>,
    /// Insertion order (id, seq) for expiry and eviction; pairs whose entry is gone or was
    /// replaced are skipped.
    order: VecDeque<(Uuid, u64)>,
    bytes: usize,
    seq: u64,
}

impl Inner {
    fn drop_all(&mut self) {
        self.gate.advance();
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    fn remove(&mut self, id: &Uuid) {
        if let Some(e) = self.entries.remove(id) {
            self.bytes -= e.cost;
        }
    }

    /// Removes from the front of the order while `evict` says so for the live entry there.
    fn trim(&mut self, mut evict: impl FnMut(&Entry, usize) -> bool) {
        while let Some(&(id, seq)) = self.order.front() {
            match self.entries.get(&id) {
                Some(e) if e.seq == seq => {
                    if !evict(e, self.bytes) {
                        return;
                    }
                    self.remove(&id);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct MemoryCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_bytes: usize,
}

/// The bookkeeping of one entry besides its strings, in bytes (an estimate).
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Memory>() + 128;

fn cost_of(m: &Memory) -> usize {
    ENTRY_OVERHEAD
        + m.namespace.len()
        + m.owner.len()
        + m.content.len()
        + m.summary.len()
        + m.kind.len()
        + m.tags.iter().map(|t| t.len() + 24).sum::<usize>()
        + m.metadata.to_string().len() * 2
        + m.grants.iter().map(|g| g.agent_id.len() + 64).sum::<usize>()
        + m.embedding_model.as_ref().map_or(0, String::len)
}

impl MemoryCache {
    /// A cache of at most `max_bytes` (estimated) whose entries live for `ttl`, storing
    /// nothing until [`crate::store::notify::follow`] or [`MemoryCache::set_enabled`] turns it
    /// on.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self { inner: Mutex::default(), ttl, max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch to pass to [`MemoryCache::insert`] after reading; `None` when nothing may be
    /// stored now.
    pub fn epoch(&self) -> Option<u64> {
        self.lock().gate.current()
    }

    /// The entry for `id` if there is a fresh one.
    pub fn get(&self, id: Uuid) -> Option<Arc<Memory>> {
        let inner = self.lock();
        let e = inner.entries.get(&id)?;
        (e.stored.elapsed() < self.ttl).then(|| e.memory.clone())
    }

    /// The entry for `id` if there is a fresh one that `p`, addressing `target_ns`, may see at
    /// `now` ([`visible_to`]).
    pub fn get_visible(&self, p: &Principal, target_ns: &str, id: Uuid, now: DateTime<Utc>) -> Option<Arc<Memory>> {
        self.get(id).filter(|m| visible_to(p, target_ns, m, now))
    }

    /// Stores `memory` as read under `epoch`, unless anything was dropped since then.
    pub fn insert(&self, epoch: u64, memory: Memory) {
        let cost = cost_of(&memory);
        if cost > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if !inner.gate.admits(epoch) {
            return;
        }
        let id = memory.id;
        inner.remove(&id);
        let ttl = self.ttl;
        let max = self.max_bytes;
        inner.trim(|e, bytes| e.stored.elapsed() >= ttl || bytes + cost > max);
        inner.seq += 1;
        let seq = inner.seq;
        inner.entries.insert(id, Entry { memory: Arc::new(memory), stored: Instant::now(), cost, seq });
        inner.order.push_back((id, seq));
        inner.bytes += cost;
        // Pairs of replaced or dropped entries: compact once they dominate.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let mut live: Vec<(Uuid, u64)> = inner.entries.iter().map(|(id, e)| (*id, e.seq)).collect();
            live.sort_by_key(|(_, seq)| *seq);
            inner.order = live.into();
        }
    }

    /// Drops the entries of `ids` (they changed).
    pub fn invalidate(&self, ids: &[Uuid]) {
        let mut inner = self.lock();
        inner.gate.advance();
        for id in ids {
            inner.remove(id);
        }
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.lock().drop_all();
    }

    /// Turns storing on or off; either way every entry is dropped.
    pub fn set_enabled(&self, on: bool) {
        let mut inner = self.lock();
        inner.drop_all();
        inner.gate.set_open(on);
    }

    /// The number of entries and their estimated bytes.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

impl ChangeSink for MemoryCache {
    fn apply(&self, change: &Change) {
        match change {
            Change::Memories(ids) => self.invalidate(ids),
            Change::AllMemories => MemoryCache::clear(self),
            _ => {}
        }
    }

    fn set_listening(&self, listening: bool) {
        self.set_enabled(listening);
    }

    fn clear(&self) {
        MemoryCache::clear(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{auth::Role, memory::Grant};

    fn memory(owner: &str, ns: &str, level: AccessLevel) -> Memory {
        let mut m = crate::memory::test_memory(Uuid::now_v7(), owner, ns, level);
        m.content = "x".repeat(100);
        m
    }

    fn on(max: usize, ttl: Duration) -> MemoryCache {
        let c = MemoryCache::new(max, ttl);
        c.set_enabled(true);
        c
    }

    #[test]
    fn stores_only_when_enabled_and_nothing_changed_since_the_read_began() {
        let c = MemoryCache::new(1 << 20, Duration::from_secs(60));
        assert_eq!(c.epoch(), None, "off until changes are announced");
        c.set_enabled(true);
        let m = memory("a", "n", AccessLevel::Private);
        let id = m.id;

        let before = c.epoch().expect("on");
        c.invalidate(&[Uuid::now_v7()]); // any change while the read was running
        c.insert(before, m.clone());
        assert!(c.get(id).is_none(), "a read that overlapped a change is not stored");

        let e = c.epoch().expect("on");
        c.insert(e, m.clone());
        assert_eq!(c.get(id).as_deref(), Some(&m));
        c.invalidate(&[id]);
        assert!(c.get(id).is_none());

        let e = c.epoch().expect("on");
        c.insert(e, m.clone());
        c.set_enabled(false);
        assert!(c.get(id).is_none(), "turning off empties");
        c.insert(e, m.clone());
        assert!(c.get(id).is_none());
        assert_eq!(c.size(), (0, 0));
    }

    #[test]
    fn entries_expire_and_the_budget_evicts_the_oldest() {
        let c = on(1 << 20, Duration::from_millis(30));
        let m = memory("a", "n", AccessLevel::Private);
        c.insert(c.epoch().expect("on"), m.clone());
        assert!(c.get(m.id).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get(m.id).is_none(), "expired");

        let one = cost_of(&memory("a", "n", AccessLevel::Private));
        let c = on(3 * one, Duration::from_secs(60));
        let ms: Vec<Memory> = (0..5).map(|_| memory("a", "n", AccessLevel::Private)).collect();
        for m in &ms {
            c.insert(c.epoch().expect("on"), m.clone());
        }
        assert_eq!(c.size(), (3, 3 * one));
        assert!(c.get(ms[0].id).is_none() && c.get(ms[1].id).is_none(), "the oldest went");
        assert!(ms[2..].iter().all(|m| c.get(m.id).is_some()));

        // Re-storing and dropping many times keeps the order bounded.
        for _ in 0..1000 {
            c.insert(c.epoch().expect("on"), ms[4].clone());
            c.invalidate(&[ms[3].id]);
            c.insert(c.epoch().expect("on"), ms[3].clone());
        }
        assert!(c.lock().order.len() <= 2 * 3 + 64 + 1);
        assert_eq!(c.size().1, 3 * one, "the byte count follows replacements");

        let mut big = memory("a", "n", AccessLevel::Private);
        big.content = "y".repeat(4 * one);
        c.insert(c.epoch().expect("on"), big.clone());
        assert!(c.get(big.id).is_none(), "larger than the whole budget: not stored");
        assert_eq!(c.size().0, 3);
    }

    #[test]
    fn visibility_is_the_stores_rule() {
        let now = Utc::now();
        let alice = Principal::new("alice", "red", Role::Agent);
        let bob = Principal::new("bob", "red", Role::Agent);
        let carol = Principal::new("carol", "blue", Role::Agent);
        let root = Principal::new("root", "red", Role::Admin);

        let private = memory("alice", "red", AccessLevel::Private);
        assert!(visible_to(&alice, "red", &private, now));
        assert!(!visible_to(&bob, "red", &private, now));
        assert!(visible_to(&root, "red", &private, now), "an admin sees the namespace it addresses");
        assert!(!visible_to(&root, "blue", &private, now), "but not from another namespace");

        let team = memory("alice", "red", AccessLevel::Team);
        assert!(visible_to(&bob, "red", &team, now));
        assert!(!visible_to(&carol, "blue", &team, now));
        assert!(!visible_to(&carol, "red", &team, now), "the caller's own namespace counts, not the address");

        for level in [AccessLevel::Public, AccessLevel::System] {
            assert!(visible_to(&carol, "blue", &memory("alice", "red", level), now));
        }

        let mut shared = memory("alice", "red", AccessLevel::Shared);
        assert!(!visible_to(&carol, "blue", &shared, now));
        shared.grants = vec![Grant {
            agent_id: "carol".into(),
            permission: crate::memory::Permission::Read,
            expire_time: Some(now + chrono::Duration::seconds(60)),
        }];
        assert!(visible_to(&carol, "blue", &shared, now));
        assert!(!visible_to(&bob, "red", &shared, now), "a grant is for its agent only");
        assert!(!visible_to(&carol, "blue", &shared, now + chrono::Duration::seconds(61)), "expired grant");
        let mut team_with_grant = memory("alice", "red", AccessLevel::Team);
        team_with_grant.grants = shared.grants.clone();
        assert!(!visible_to(&carol, "blue", &team_with_grant, now), "grants count only for SHARED");

        let mut expiring = memory("alice", "red", AccessLevel::Public);
        expiring.expire_time = Some(now);
        assert!(!visible_to(&alice, "red", &expiring, now), "expired memories are nobody's");
        assert!(!visible_to(&root, "red", &expiring, now));
    }
}
