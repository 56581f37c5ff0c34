//! The credential cache (PostgreSQL backend): API keys found by id, and agents found by id for
//! JWTs, remembered for `TMWS_AUTH_CACHE_TTL` so that an authenticated call does not cost a
//! database read.
//!
//! Only what was found is remembered (an unknown key id is looked up every time). Everything
//! that decides a call is still checked on each one: the secret against the stored hash, the
//! key's revocation and expiry, the agent's status, the scopes. What can change is kept fresh the
//! way the GetMemory cache is (src/memory/cache.rs): every change to `agents` or `api_keys` is
//! announced by triggers (migration 0013) and empties the cache on every replica; a replica's
//! own changes empty it before they answer; a lookup that overlapped a change is not stored; while
//! the listening connection is down nothing is kept; and entries expire after the TTL whatever
//! happens.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::store::{
    identity::{Agent, KeyLookup},
    notify::{Change, ChangeSink, Gate},
};

#[derive(Debug)]
struct Entries<K, V> {
    map: HashMap<K, (Arc<V>, Instant)>,
}

impl<K: Hash + Eq, V> Default for Entries<K, V> {
    fn default() -> Self {
        Self { map: HashMap::new() }
    }
}

impl<K: Hash + Eq, V> Entries<K, V> {
    fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q, ttl: Duration) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
    {
        self.map.get(k).filter(|(_, at)| at.elapsed() < ttl).map(|(v, _)| v.clone())
    }

    fn insert(&mut self, k: K, v: Arc<V>, ttl: Duration, max: usize) {
        if self.map.len() >= max {
            self.map.retain(|_, (_, at)| at.elapsed() < ttl);
            if self.map.len() >= max {
                self.map.clear();
            }
        }
        self.map.insert(k, (v, Instant::now()));
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Open while changes are announced; advanced by every drop.
    gate: Gate,
    keys: Entries<String, KeyLookup>,
    agents: Entries<String, Agent>,
}

impl Inner {
    fn drop_all(&mut self) {
        self.gate.advance();
        self.keys.map.clear();
        self.agents.map.clear();
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct AuthCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_entries: usize,
}

impl AuthCache {
    /// At most `max_entries` keys and as many agents, each for `ttl`; stores nothing until
    /// [`crate::store::notify::follow`] or [`AuthCache::set_enabled`] turns it on.
    pub fn new(max_entries: usize, ttl: Duration) -> Self {
        Self { inner: Mutex::default(), ttl, max_entries }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch to pass to an insert after the lookup; `None` when nothing may be stored now.
    pub fn epoch(&self) -> Option<u64> {
        self.lock().gate.current()
    }

    pub fn key(&self, key_id: &str) -> Option<Arc<KeyLookup>> {
        self.lock().keys.get(key_id, self.ttl)
    }

    pub fn agent(&self, agent_id: &str) -> Option<Arc<Agent>> {
        self.lock().agents.get(agent_id, self.ttl)
    }

    /// Remembers a key found under `epoch`, unless anything changed since.
    pub fn insert_key(&self, epoch: u64, key_id: &str, found: Arc<KeyLookup>) {
        let mut inner = self.lock();
        if inner.gate.admits(epoch) {
            inner.keys.insert(key_id.to_string(), found, self.ttl, self.max_entries);
        }
    }

    /// Remembers an agent found under `epoch`, unless anything changed since.
    pub fn insert_agent(&self, epoch: u64, found: Arc<Agent>) {
        let mut inner = self.lock();
        if inner.gate.admits(epoch) {
            inner.agents.insert(found.id.clone(), found, self.ttl, self.max_entries);
        }
    }

    /// Forgets everything (an agent or a key changed).
    pub fn clear(&self) {
        self.lock().drop_all();
    }

    /// Turns storing on or off; either way everything is forgotten.
    pub fn set_enabled(&self, on: bool) {
        let mut inner = self.lock();
        inner.drop_all();
        inner.gate.set_open(on);
    }
}

impl ChangeSink for AuthCache {
    fn apply(&self, change: &Change) {
        if *change == Change::Identity {
            AuthCache::clear(self);
        }
    }

    fn set_listening(&self, listening: bool) {
        self.set_enabled(listening);
    }

    fn clear(&self) {
        AuthCache::clear(self);
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::{
        auth::{AgentStatus, Role},
        store::identity::ApiKey,
    };

    fn agent(id: &str) -> Agent {
        Agent {
            id: id.into(),
            namespace: "ns".into(),
            display_name: String::new(),
            role: Role::Agent,
            status: AgentStatus::Active,
            create_time: Utc::now(),
            update_time: Utc::now(),
            version: 1,
        }
    }

    fn lookup(key_id: &str) -> Arc<KeyLookup> {
        Arc::new(KeyLookup {
            key: ApiKey {
                id: key_id.into(),
                agent_id: "a".into(),
                display_name: String::new(),
                scopes: vec![],
                create_time: Utc::now(),
                expire_time: None,
                revoke_time: None,
                created_by: None,
            },
            secret_hash: vec![0; 32],
            agent: agent("a"),
        })
    }

    #[test]
    fn remembers_only_while_on_and_when_nothing_changed_during_the_lookup() {
        let c = AuthCache::new(100, Duration::from_secs(60));
        assert_eq!(c.epoch(), None);
        c.set_enabled(true);
        let e = c.epoch().expect("on");
        c.clear(); // a change while the lookup ran
        c.insert_key(e, "k1", lookup("k1"));
        assert!(c.key("k1").is_none());
        let e = c.epoch().expect("on");
        c.insert_key(e, "k1", lookup("k1"));
        c.insert_agent(e, Arc::new(agent("a")));
        assert!(c.key("k1").is_some() && c.agent("a").is_some());
        c.clear();
        assert!(c.key("k1").is_none() && c.agent("a").is_none(), "any identity change forgets all");
        let e = c.epoch().expect("on");
        c.insert_key(e, "k1", lookup("k1"));
        c.set_enabled(false);
        assert!(c.key("k1").is_none());
    }

    #[test]
    fn entries_expire_and_stay_bounded() {
        let c = AuthCache::new(3, Duration::from_millis(30));
        c.set_enabled(true);
        for i in 0..10 {
            let e = c.epoch().expect("on");
            c.insert_key(e, &format!("k{i}"), lookup(&format!("k{i}")));
            assert!(c.lock().keys.map.len() <= 3);
        }
        assert!(c.key("k9").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.key("k9").is_none(), "expired");
    }
}
