//! The in-process copy of the stored vectors that semantic search scores exactly.
//!
//! Per (model, dimension) one `VectorSet`: a contiguous `Vec<f32>` of L2-normalised vectors,
//! the parallel row keys (`memories.seq`), and per row the facts of a cheap visibility
//! pre-check (namespace, owner, access level, expiry). Cosine similarity is then one dot
//! product per row, written so the compiler vectorises it.
//!
//! The copy is a cache; SQL stays authoritative: search verifies every candidate it returns
//! with one statement that applies the access rules, the filter and the expiry. The copy of a
//! (model, dimension) is loaded on first use on the writer connection (no write can commit while
//! it reads) and installed before that connection is released; every later committed change is
//! applied right after its commit. A write interrupted during its commit, or whose commit fails,
//! clears the copy (`PendingChange`), and the next search reloads it. Locks are never held
//! across an `.await`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

/// Lanes of the dot product: 16 independent accumulators (four SSE or two AVX registers).
const LANES: usize = 16;

/// Scored rows: (cosine similarity, `memories.seq`).
pub(crate) type Scored = Vec<(f32, i64)>;

/// An expiry that never comes.
const NEVER: i64 = i64::MAX;

/// One stored vector and the facts the visibility pre-check needs.
#[derive(Debug, Clone)]
pub(crate) struct VectorRow {
    pub seq: i64,
    pub model: String,
    pub namespace: String,
    pub owner: String,
    pub access_level: i16,
    pub expire_time: Option<i64>,
    /// As stored (normalised when it enters the copy).
    pub vector: Vec<f32>,
}

/// Who searches where, for the pre-check: it rules out only rows the SQL visibility rule would
/// rule out too (SHARED rows pass; their grants are checked by SQL).
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The namespace searched.
    pub namespace: String,
    pub agent_id: String,
    /// The caller's own namespace (TEAM rows are visible there).
    pub home_namespace: String,
    pub admin: bool,
    /// Microseconds since the epoch; rows expiring at or before it are invisible.
    pub now: i64,
}

#[derive(Debug, Clone, Copy)]
struct SlotMeta {
    namespace: u32,
    owner: u32,
    access_level: u8,
    expire: i64,
}

/// The vectors of one (model, dimension).
#[derive(Debug, Default)]
struct VectorSet {
    dim: usize,
    /// `seqs.len() * dim` normalised components.
    data: Vec<f32>,
    seqs: Vec<i64>,
    meta: Vec<SlotMeta>,
    slot_of: HashMap<i64, usize>,
}

impl VectorSet {
    fn new(dim: usize) -> Self {
        Self { dim, ..Self::default() }
    }

    fn vector(&self, slot: usize) -> &[f32] {
        &self.data[slot * self.dim..(slot + 1) * self.dim]
    }

    /// Inserts or replaces the row `seq`; `vector` must have `dim` components.
    fn put(&mut self, seq: i64, meta: SlotMeta, vector: &[f32]) {
        match self.slot_of.get(&seq) {
            Some(&slot) => {
                self.data[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(vector);
                self.meta[slot] = meta;
            }
            None => {
                self.slot_of.insert(seq, self.seqs.len());
                self.seqs.push(seq);
                self.meta.push(meta);
                self.data.extend_from_slice(vector);
            }
        }
    }

    /// Removes the row `seq` (the last slot moves into its place).
    fn remove(&mut self, seq: i64) -> bool {
        let Some(slot) = self.slot_of.remove(&seq) else { return false };
        let last = self.seqs.len() - 1;
        if slot != last {
            self.data.copy_within(last * self.dim..(last + 1) * self.dim, slot * self.dim);
            let moved = self.seqs[last];
            self.slot_of.insert(moved, slot);
        }
        self.data.truncate(last * self.dim);
        self.seqs.swap_remove(slot);
        self.meta.swap_remove(slot);
        true
    }
}

#[derive(Debug, Default)]
struct State {
    sets: HashMap<(String, usize), VectorSet>,
    /// Dimensions whose every model is loaded: a model first seen there starts an empty set.
    complete: HashSet<usize>,
    /// Interned namespaces and owners.
    names: HashMap<String, u32>,
}

impl State {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.insert(name.to_string(), id);
        id
    }

    fn meta(&mut self, row: &VectorRow) -> SlotMeta {
        SlotMeta {
            namespace: self.intern(&row.namespace),
            owner: self.intern(&row.owner),
            access_level: u8::try_from(row.access_level).unwrap_or(0),
            expire: row.expire_time.unwrap_or(NEVER),
        }
    }

    fn tracks(&self, model: &str, dim: usize) -> bool {
        self.complete.contains(&dim) || self.sets.contains_key(&(model.to_string(), dim))
    }

    fn remove(&mut self, seq: i64) {
        for set in self.sets.values_mut() {
            if set.remove(seq) {
                return;
            }
        }
    }

    /// Puts `row` into its set when that set is tracked (after removing it from any other).
    fn upsert(&mut self, mut row: VectorRow) {
        let dim = row.vector.len();
        self.remove(row.seq);
        if dim == 0 || !self.tracks(&row.model, dim) {
            return;
        }
        normalize(&mut row.vector);
        let meta = self.meta(&row);
        let set = self.sets.entry((std::mem::take(&mut row.model), dim)).or_insert_with(|| VectorSet::new(dim));
        set.put(row.seq, meta, &row.vector);
    }
}

/// The copy of the stored vectors (cheap to clone: a shared handle).
#[derive(Debug, Default, Clone)]
pub struct VectorIndex {
    state: Arc<RwLock<State>>,
}

impl VectorIndex {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the vectors of (model, dim) are loaded (and kept up to date).
    pub(crate) fn tracks(&self, model: &str, dim: usize) -> bool {
        self.read().tracks(model, dim)
    }

    /// How many vectors of (model, dim) the copy holds, when it is loaded.
    #[cfg(test)]
    pub(crate) fn len(&self, model: &str, dim: usize) -> Option<usize> {
        let state = self.read();
        match state.sets.get(&(model.to_string(), dim)) {
            Some(set) => Some(set.seqs.len()),
            None => state.complete.contains(&dim).then_some(0),
        }
    }

    /// Replaces the copy of one dimension: of one model, or of every model (`model` None; the
    /// dimension is then complete: a model first seen later starts empty).
    pub(crate) fn install(&self, dim: usize, model: Option<&str>, rows: Vec<VectorRow>) {
        let mut state = self.write();
        match model {
            Some(model) => {
                state.sets.remove(&(model.to_string(), dim));
            }
            None => {
                state.sets.retain(|(_, d), _| *d != dim);
                state.complete.insert(dim);
            }
        }
        if let Some(model) = model {
            state.sets.insert((model.to_string(), dim), VectorSet::new(dim));
        }
        for mut row in rows {
            if row.vector.len() != dim {
                continue;
            }
            normalize(&mut row.vector);
            let meta = state.meta(&row);
            let set = state.sets.entry((std::mem::take(&mut row.model), dim)).or_insert_with(|| VectorSet::new(dim));
            set.put(row.seq, meta, &row.vector);
        }
    }

    /// Applies committed inserts and vector replacements (rows of untracked sets are skipped).
    pub(crate) fn upsert(&self, rows: Vec<VectorRow>) {
        if rows.is_empty() {
            return;
        }
        let mut state = self.write();
        for row in rows {
            state.upsert(row);
        }
    }

    /// Applies a committed change of a row's access level or expiry.
    pub(crate) fn set_access(&self, seq: i64, access_level: i16, expire_time: Option<i64>) {
        let mut state = self.write();
        for set in state.sets.values_mut() {
            if let Some(&slot) = set.slot_of.get(&seq) {
                set.meta[slot].access_level = u8::try_from(access_level).unwrap_or(0);
                set.meta[slot].expire = expire_time.unwrap_or(NEVER);
                return;
            }
        }
    }

    /// Applies committed deletes.
    pub(crate) fn remove(&self, seqs: &[i64]) {
        if seqs.is_empty() {
            return;
        }
        let mut state = self.write();
        for &seq in seqs {
            state.remove(seq);
        }
    }

    /// Forgets everything; each (model, dimension) is reloaded on its next use.
    pub(crate) fn clear(&self) {
        let mut state = self.write();
        state.sets.clear();
        state.complete.clear();
    }

    /// Marks a change about to commit: unless [`PendingChange::applied`] is called, the copy is
    /// cleared when the marker is dropped (the commit was interrupted or failed, so whether it
    /// happened is unknown).
    pub(crate) fn begin_change(&self) -> PendingChange<'_> {
        PendingChange { index: self, applied: false }
    }

    /// Scores every row of (model, dim) in `viewer.namespace` that may be visible to `viewer`
    /// and reaches `min_score`: (cosine similarity, seq), unordered. `query` must be normalised.
    /// None when (model, dim) is not loaded.
    pub(crate) fn score_visible(&self, model: &str, query: &[f32], viewer: &Viewer, min_score: f32) -> Option<Scored> {
        let state = self.read();
        let dim = query.len();
        let Some(set) = state.sets.get(&(model.to_string(), dim)) else {
            return state.complete.contains(&dim).then(Vec::new);
        };
        let Some(&ns) = state.names.get(&viewer.namespace) else { return Some(Vec::new()) };
        // An owner id no row has when the caller owns nothing.
        let me = state.names.get(&viewer.agent_id).copied().unwrap_or(u32::MAX);
        let team = viewer.home_namespace == viewer.namespace;
        let mut out = Vec::new();
        for (slot, meta) in set.meta.iter().enumerate() {
            if meta.namespace != ns || meta.expire <= viewer.now {
                continue;
            }
            let may_see = viewer.admin
                || meta.owner == me
                || (meta.access_level == 2 && team)
                || matches!(meta.access_level, 3..=5);
            if !may_see {
                continue;
            }
            let score = dot(set.vector(slot), query);
            if score >= min_score {
                out.push((score, set.seqs[slot]));
            }
        }
        Some(out)
    }

    /// Scores the rows `seqs` of (model, dim) that reach `min_score`; also returns the rows the
    /// copy does not hold. None when (model, dim) is not loaded.
    pub(crate) fn score_rows(
        &self,
        model: &str,
        query: &[f32],
        seqs: &[i64],
        min_score: f32,
    ) -> Option<(Scored, Vec<i64>)> {
        let state = self.read();
        let dim = query.len();
        let Some(set) = state.sets.get(&(model.to_string(), dim)) else {
            return state.complete.contains(&dim).then(|| (Vec::new(), seqs.to_vec()));
        };
        let mut out = Vec::with_capacity(seqs.len());
        let mut missing = Vec::new();
        for &seq in seqs {
            match set.slot_of.get(&seq) {
                Some(&slot) => {
                    let score = dot(set.vector(slot), query);
                    if score >= min_score {
                        out.push((score, seq));
                    }
                }
                None => missing.push(seq),
            }
        }
        Some((out, missing))
    }
}

/// A change to the stored vectors about to commit; see [`VectorIndex::begin_change`].
#[must_use = "call `applied` after applying the committed change"]
pub(crate) struct PendingChange<'a> {
    index: &'a VectorIndex,
    applied: bool,
}

impl PendingChange<'_> {
    /// Applies the committed change to the copy.
    pub(crate) fn applied(mut self, apply: impl FnOnce(&VectorIndex)) {
        apply(self.index);
        self.applied = true;
    }
}

impl Drop for PendingChange<'_> {
    fn drop(&mut self) {
        if !self.applied {
            tracing::warn!("a change to stored vectors may have committed unseen; the vector cache will be reloaded");
            self.index.clear();
        }
    }
}

/// The dot product of two equally long vectors (the shorter length when they are not), with
/// `LANES` (16) independent accumulators so the loop compiles to SIMD multiply-adds.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.iter().zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// Scales `v` to unit length; false (and `v` unchanged) when it is all zeros or not finite.
pub fn normalize(v: &mut [f32]) -> bool {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return false;
    }
    let inv = (1.0 / norm) as f32;
    for x in v.iter_mut() {
        *x *= inv;
    }
    true
}

/// A vector as stored: little-endian f32.
pub fn encode(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The inverse of [`encode`]; None when the length is not a multiple of 4.
pub fn decode(bytes: &[u8]) -> Option<Vec<f32>> {
    let (chunks, rest) = bytes.as_chunks::<4>();
    if !rest.is_empty() {
        return None;
    }
    Some(chunks.iter().map(|c| f32::from_le_bytes(*c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        // splitmix64
        *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn row(seq: i64, ns: &str, owner: &str, level: i16, vector: Vec<f32>) -> VectorRow {
        VectorRow {
            seq,
            model: "m".into(),
            namespace: ns.into(),
            owner: owner.into(),
            access_level: level,
            expire_time: None,
            vector,
        }
    }

    #[test]
    fn dot_matches_the_naive_sum_at_every_length() {
        let mut seed = 7;
        for n in [0, 1, 3, 15, 16, 17, 31, 32, 100, 384, 385] {
            let a: Vec<f32> = (0..n).map(|_| rng(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng(&mut seed)).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn normalize_and_codec() {
        let mut v = vec![3.0, 4.0];
        assert!(normalize(&mut v));
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut zero = vec![0.0; 4];
        assert!(!normalize(&mut zero));
        assert_eq!(zero, vec![0.0; 4]);
        let x = vec![1.5f32, -0.25, f32::MIN_POSITIVE, 1e30];
        assert_eq!(decode(&encode(&x)), Some(x));
        assert_eq!(decode(&[1, 2, 3]), None);
    }

    #[test]
    fn slots_stay_consistent_through_upserts_and_removes() {
        let index = VectorIndex::default();
        // Untracked: changes are ignored until the dimension is loaded.
        index.upsert(vec![row(1, "red", "alice", 1, vec![1.0, 0.0])]);
        assert_eq!(index.len("m", 2), None);
        index.install(
            2,
            None,
            vec![row(1, "red", "alice", 1, vec![2.0, 0.0]), row(2, "red", "bob", 1, vec![0.0, 1.0])],
        );
        assert_eq!(index.len("m", 2), Some(2));
        index.upsert(vec![row(3, "red", "alice", 4, vec![1.0, 1.0]), row(4, "blue", "carol", 4, vec![-1.0, 0.0])]);
        index.remove(&[1]);
        assert_eq!(index.len("m", 2), Some(3));
        // A model first seen in a complete dimension starts its own set.
        let mut other = row(5, "red", "alice", 1, vec![1.0, 0.0]);
        other.model = "other".into();
        index.upsert(vec![other]);
        assert_eq!(index.len("other", 2), Some(1));

        let viewer = |agent: &str, admin: bool| Viewer {
            namespace: "red".into(),
            agent_id: agent.into(),
            home_namespace: "red".into(),
            admin,
            now: 0,
        };
        let mut alice = index.score_visible("m", &[1.0, 0.0], &viewer("alice", false), -1.0).expect("loaded");
        alice.sort_by(|a, b| b.0.total_cmp(&a.0));
        // bob's PRIVATE row is ruled out; alice's public one and nothing from blue remain.
        assert_eq!(alice.iter().map(|s| s.1).collect::<Vec<_>>(), vec![3]);
        assert!((alice[0].0 - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        let admin = index.score_visible("m", &[1.0, 0.0], &viewer("root", true), -1.0).expect("loaded");
        assert_eq!(admin.len(), 2);

        // Replacing a vector moves it; access changes apply to the pre-check.
        index.upsert(vec![row(3, "red", "alice", 4, vec![0.0, -5.0])]);
        index.set_access(2, 4, None);
        let (scored, missing) = index.score_rows("m", &[0.0, 1.0], &[2, 3, 99], -1.0).expect("loaded");
        assert_eq!(missing, vec![99]);
        let by_seq: HashMap<i64, f32> = scored.into_iter().map(|(s, q)| (q, s)).collect();
        assert!((by_seq[&2] - 1.0).abs() < 1e-6 && (by_seq[&3] + 1.0).abs() < 1e-6);
        let alice = index.score_visible("m", &[0.0, 1.0], &viewer("alice", false), 0.5).expect("loaded");
        assert_eq!(alice.iter().map(|s| s.1).collect::<Vec<_>>(), vec![2], "min_score applies");

        // Expired rows are ruled out.
        let mut expiring = row(6, "red", "alice", 4, vec![0.0, 1.0]);
        expiring.expire_time = Some(10);
        index.upsert(vec![expiring]);
        let later = Viewer { now: 10, ..viewer("alice", false) };
        assert!(index.score_visible("m", &[0.0, 1.0], &later, -1.0).expect("loaded").iter().all(|s| s.1 != 6));

        // An interrupted change clears everything.
        drop(index.begin_change());
        assert_eq!(index.len("m", 2), None);
        assert!(index.score_visible("m", &[0.0, 1.0], &viewer("alice", false), -1.0).is_none());
    }

    #[test]
    fn removal_keeps_every_other_vector_in_place() {
        let index = VectorIndex::default();
        let mut seed = 3;
        let rows: Vec<VectorRow> =
            (0..50).map(|i| row(i, "red", "alice", 1, (0..8).map(|_| rng(&mut seed)).collect())).collect();
        index.install(8, Some("m"), rows.clone());
        index.remove(&(0..50).filter(|i| i % 3 == 0).collect::<Vec<_>>());
        let q = rows[10].vector.clone();
        let mut qn = q.clone();
        normalize(&mut qn);
        let seqs: Vec<i64> = (0..50).collect();
        let (scored, missing) = index.score_rows("m", &qn, &seqs, -2.0).expect("loaded");
        assert_eq!(missing, (0..50).filter(|i| i % 3 == 0).collect::<Vec<_>>());
        for (score, seq) in scored {
            let v = &rows[seq as usize].vector;
            let expected = crate::memory::ranking::cosine(v, &q);
            assert!((f64::from(score) - expected).abs() < 1e-5, "seq {seq}");
        }
    }
}
