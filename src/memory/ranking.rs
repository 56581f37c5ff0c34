//! Search ranking: reciprocal rank fusion for hybrid search, and maximal marginal relevance.

use std::collections::HashMap;

use uuid::Uuid;

use super::{ScoredMemory, SearchHit};

/// The RRF constant `k` (Cormack et al.): score = sum over lists of 1 / (k + rank).
pub const RRF_K: f64 = 60.0;

/// Cosine similarity of two vectors (0 when either is all-zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

/// A single list as final hits: score is the list's own score, ranks start at 1.
pub fn single_list(list: Vec<ScoredMemory>, semantic: bool) -> Vec<(SearchHit, Option<Vec<f32>>)> {
    list.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let rank = Some(i as i32 + 1);
            let hit = SearchHit {
                memory: s.memory,
                score: s.score,
                semantic_score: semantic.then_some(s.score),
                semantic_rank: if semantic { rank } else { None },
                keyword_score: (!semantic).then_some(s.score),
                keyword_rank: if semantic { None } else { rank },
            };
            (hit, s.vector)
        })
        .collect()
}

/// Fuses a semantic and a keyword list by reciprocal rank fusion, best first. Ties keep the
/// semantic order, then the keyword order.
pub fn reciprocal_rank_fusion(
    semantic: Vec<ScoredMemory>,
    keyword: Vec<ScoredMemory>,
) -> Vec<(SearchHit, Option<Vec<f32>>)> {
    let mut by_id: HashMap<Uuid, usize> = HashMap::new();
    let mut hits: Vec<(SearchHit, Option<Vec<f32>>)> = Vec::new();
    for (i, s) in semantic.into_iter().enumerate() {
        let rank = i as i32 + 1;
        by_id.insert(s.memory.id, hits.len());
        hits.push((
            SearchHit {
                memory: s.memory,
                score: 1.0 / (RRF_K + f64::from(rank)),
                semantic_score: Some(s.score),
                semantic_rank: Some(rank),
                keyword_score: None,
                keyword_rank: None,
            },
            s.vector,
        ));
    }
    for (i, s) in keyword.into_iter().enumerate() {
        let rank = i as i32 + 1;
        let contribution = 1.0 / (RRF_K + f64::from(rank));
        match by_id.get(&s.memory.id) {
            Some(&idx) => {
                let hit = &mut hits[idx].0;
                hit.score += contribution;
                hit.keyword_score = Some(s.score);
                hit.keyword_rank = Some(rank);
            }
            None => {
                by_id.insert(s.memory.id, hits.len());
                hits.push((
                    SearchHit {
                        memory: s.memory,
                        score: contribution,
                        semantic_score: None,
                        semantic_rank: None,
                        keyword_score: Some(s.score),
                        keyword_rank: Some(rank),
                    },
                    s.vector,
                ));
            }
        }
    }
    // Stable sort keeps insertion order (semantic first) among equal scores.
    hits.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
    hits
}

/// Maximal marginal relevance: greedily picks `k` hits maximising
/// `(1 - diversity) * relevance - diversity * max_similarity_to_already_picked`.
/// Relevance is the hit's score scaled to 0..1 within the candidates. Hits without a vector
/// count as dissimilar to everything.
pub fn mmr(candidates: Vec<(SearchHit, Option<Vec<f32>>)>, k: usize, diversity: f64) -> Vec<SearchHit> {
    if diversity <= 0.0 || candidates.len() <= 1 {
        return candidates.into_iter().take(k).map(|(h, _)| h).collect();
    }
    let lambda = 1.0 - diversity.clamp(0.0, 1.0);
    let (min, max) = candidates
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (h, _)| (lo.min(h.score), hi.max(h.score)));
    let span = if max > min { max - min } else { 1.0 };
    let mut remaining: Vec<(SearchHit, Option<Vec<f32>>)> = candidates;
    let mut picked: Vec<(SearchHit, Option<Vec<f32>>)> = Vec::with_capacity(k);
    while picked.len() < k && !remaining.is_empty() {
        let mut best = 0;
        let mut best_value = f64::NEG_INFINITY;
        for (i, (hit, vector)) in remaining.iter().enumerate() {
            let relevance = (hit.score - min) / span;
            let redundancy = match vector {
                None => 0.0,
                Some(v) => {
                    picked.iter().filter_map(|(_, pv)| pv.as_ref().map(|pv| cosine(v, pv))).fold(0.0f64, f64::max)
                }
            };
            let value = lambda * relevance - (1.0 - lambda) * redundancy;
            if value > best_value {
                best_value = value;
                best = i;
            }
        }
        picked.push(remaining.remove(best));
    }
    picked.into_iter().map(|(h, _)| h).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{AccessLevel, Memory};

    fn mem(n: u128) -> Memory {
        crate::memory::test_memory(Uuid::from_u128(n), "a", "ns", AccessLevel::Team)
    }

    fn scored(n: u128, score: f64, v: Option<Vec<f32>>) -> ScoredMemory {
        ScoredMemory { memory: mem(n), score, vector: v }
    }

    #[test]
    fn rrf_rewards_items_in_both_lists() {
        let semantic = vec![scored(1, 0.9, None), scored(2, 0.8, None), scored(3, 0.7, None)];
        let keyword = vec![scored(3, 2.0, None), scored(4, 1.0, None)];
        let fused = reciprocal_rank_fusion(semantic, keyword);
        let ids: Vec<u128> = fused.iter().map(|(h, _)| h.memory.id.as_u128()).collect();
        assert_eq!(ids[0], 3, "in both lists wins: {ids:?}");
        assert_eq!(ids.len(), 4);
        let top = &fused[0].0;
        assert_eq!(top.semantic_rank, Some(3));
        assert_eq!(top.keyword_rank, Some(1));
        assert!((top.score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
        let only_kw = fused.iter().find(|(h, _)| h.memory.id.as_u128() == 4).expect("4").0.clone();
        assert_eq!(only_kw.semantic_rank, None);
        assert_eq!(only_kw.keyword_score, Some(1.0));
    }

    #[test]
    fn mmr_prefers_diverse_results() {
        let a = vec![1.0, 0.0];
        let a2 = vec![0.99, 0.01];
        let b = vec![0.0, 1.0];
        let candidates =
            single_list(vec![scored(1, 0.95, Some(a)), scored(2, 0.94, Some(a2)), scored(3, 0.80, Some(b))], true);
        let plain = mmr(candidates.clone(), 2, 0.0);
        assert_eq!(plain.iter().map(|h| h.memory.id.as_u128()).collect::<Vec<_>>(), vec![1, 2]);
        let diverse = mmr(candidates, 2, 0.7);
        assert_eq!(diverse.iter().map(|h| h.memory.id.as_u128()).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
