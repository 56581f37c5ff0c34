//! SearchMemories: exact and HNSW top-k against brute force, selective filters, hybrid fusion,
//! and the plan the database uses.

use std::collections::HashSet;

use crate::common::{fresh_database, spawn_secure, test_config, test_env};
use crate::memory::{create, memory};
use tmws::{pb, store::Backend};

const DIM: usize = 32;
const N: usize = 3000;

/// A small deterministic generator (xorshift64*), so every run sees the same data.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_f64().max(1e-12), self.next_f64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn normalise(v: Vec<f64>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.into_iter().map(|x| (x / n) as f32).collect()
}

/// Clustered vectors: a mixture of Gaussians around random centres (uniform random vectors
/// make a meaningless nearest-neighbour benchmark).
fn clustered(rng: &mut Rng, centres: &[Vec<f64>]) -> Vec<f32> {
    let c = &centres[(rng.next_f64() * centres.len() as f64) as usize % centres.len()];
    normalise(c.iter().map(|x| x + 0.35 * rng.normal()).collect())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

/// Exact top-k ids by cosine similarity over `data` (brute force).
fn brute_force(data: &[(String, Vec<f32>, bool)], q: &[f32], k: usize, rare_only: bool) -> Vec<String> {
    let mut scored: Vec<(f64, &String)> =
        data.iter().filter(|(_, _, rare)| !rare_only || *rare).map(|(id, v, _)| (cosine(q, v), id)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, id)| id.clone()).collect()
}

fn search(q: &[f32], k: i32, exact: bool, filter: Option<pb::MemoryFilter>) -> pb::SearchMemoriesRequest {
    pb::SearchMemoriesRequest {
        query_embedding: q.to_vec(),
        mode: pb::SearchMode::Semantic as i32,
        top_k: k,
        exact,
        filter,
        ..Default::default()
    }
}

fn rare() -> Option<pb::MemoryFilter> {
    Some(pb::MemoryFilter { tags_any: vec!["rare".into()], ..Default::default() })
}

#[tokio::test]
async fn semantic_search_matches_brute_force() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let settings = [
        ("TMWS_EMBEDDING_PROVIDER", "none"),
        ("TMWS_EMBEDDING_DIMENSION", "32"),
        ("TMWS_HNSW_EF_SEARCH", "64"),
        ("TMWS_DB_MAX_CONNECTIONS", "8"),
    ];
    let app = spawn_secure(&db, &settings).await;
    let mut client = app.memory();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let centres: Vec<Vec<f64>> = (0..40).map(|_| (0..DIM).map(|_| rng.normal()).collect()).collect();
    let mut data: Vec<(String, Vec<f32>, bool)> = Vec::with_capacity(N);
    for chunk in 0..N / 100 {
        let mut requests = Vec::with_capacity(100);
        let mut vectors = Vec::with_capacity(100);
        for j in 0..100 {
            let i = chunk * 100 + j;
            let v = clustered(&mut rng, &centres);
            let mut m = memory(&format!("vector {i}"));
            m.embedding = v.clone();
            m.access_level = pb::AccessLevel::Team as i32;
            // 1% of rows carry the tag "rare".
            let is_rare = i % 100 == 7;
            m.tags = vec![if is_rare { "rare" } else { "common" }.into()];
            requests.push(create(m));
            vectors.push((v, is_rare));
        }
        let created = client
            .batch_create_memories(pb::BatchCreateMemoriesRequest { requests, ..Default::default() })
            .await
            .expect("batch")
            .into_inner();
        for (m, (v, is_rare)) in created.memories.into_iter().zip(vectors) {
            data.push((m.id, v, is_rare));
        }
    }
    let queries: Vec<Vec<f32>> = (0..25).map(|_| clustered(&mut rng, &centres)).collect();

    let mut hnsw_hits = 0usize;
    for q in &queries {
        let truth = brute_force(&data, q, 10, false);
        let exact = client.search_memories(search(q, 10, true, None)).await.expect("exact").into_inner();
        let got: Vec<String> =
            exact.results.iter().map(|r| r.memory.as_ref().map(|m| m.id.clone()).unwrap_or_default()).collect();
        assert_eq!(got, truth, "exact search equals brute force, in order");
        let scores: Vec<f64> = exact.results.iter().map(|r| r.score).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first");
        let top = &exact.results[0];
        assert!((top.score - cosine(q, &data.iter().find(|d| d.0 == truth[0]).expect("truth").1)).abs() < 1e-4);
        assert_eq!(top.semantic_rank, Some(1));

        let approx = client.search_memories(search(q, 10, false, None)).await.expect("hnsw").into_inner();
        assert_eq!(approx.results.len(), 10);
        let truth: HashSet<String> = truth.into_iter().collect();
        hnsw_hits += approx.results.iter().filter(|r| r.memory.as_ref().is_some_and(|m| truth.contains(&m.id))).count();

        // A 1%-selective filter still returns k results, equal to brute force over the subset.
        let filtered = client.search_memories(search(q, 10, false, rare())).await.expect("filtered").into_inner();
        let got: Vec<String> =
            filtered.results.iter().map(|r| r.memory.as_ref().map(|m| m.id.clone()).unwrap_or_default()).collect();
        assert_eq!(got, brute_force(&data, q, 10, true), "selective filters are answered exactly");
    }
    let recall = hnsw_hits as f64 / (queries.len() * 10) as f64;
    assert!(recall >= 0.95, "HNSW recall@10 = {recall}");

    // min_score drops weaker matches before LIMIT.
    let strict = client
        .search_memories(pb::SearchMemoriesRequest { min_score: Some(0.8), ..search(&queries[0], 100, false, None) })
        .await
        .expect("min_score")
        .into_inner();
    assert!(strict.results.iter().all(|r| r.score >= 0.8));
    let expected = data.iter().filter(|d| cosine(&queries[0], &d.1) >= 0.8).count().min(100);
    assert!(strict.results.len() + 2 >= expected, "{} of {expected}", strict.results.len());

    app.stop().await.expect("stop");
    if !env.is_postgres() {
        // The embedded store's search is always exact (checked above against brute force).
        return;
    }

    // The statement the server runs uses the HNSW index; the exact variant does not.
    let config = test_config(&db, None, &settings);
    let store = tmws::store::PgStore::connect(&config).await.expect("store");
    sqlx::query("ANALYZE memories").execute(store.pool()).await.expect("analyze");
    let principal = tmws::auth::Principal::new("dev-agent", "default", tmws::auth::Role::Agent);
    let filter = tmws::memory::MemoryFilter::default();
    let plan = store
        .explain_semantic(&principal, "default", &filter, &queries[0], "client", 10, false)
        .await
        .expect("explain");
    assert!(plan.contains("memories_embedding_hnsw_32"), "plan does not use the HNSW index:\n{plan}");
    let plan = store
        .explain_semantic(&principal, "default", &filter, &queries[0], "client", 10, true)
        .await
        .expect("explain exact");
    assert!(!plan.contains("memories_embedding_hnsw_32"), "exact search must not use the index:\n{plan}");
    store.close().await;

    // Forcing the HNSW path for the selective filter (threshold 0): iterative index scans still
    // return k matching rows.
    let forced = [("TMWS_EXACT_SEARCH_THRESHOLD", "0"), settings[0], settings[1]];
    let app = spawn_secure(&db, &forced).await;
    let mut client = app.memory();
    for q in queries.iter().take(5) {
        let filtered = client.search_memories(search(q, 10, false, rare())).await.expect("filtered").into_inner();
        assert_eq!(filtered.results.len(), 10, "iterative scan returns k rows");
        assert!(filtered.results.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.tags == vec!["rare"])));
    }
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn hybrid_ranks_keyword_only_and_meaning_only_matches() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &[("TMWS_EMBEDDING_PROVIDER", "none"), ("TMWS_EMBEDDING_DIMENSION", "8")]).await;
    let mut client = app.memory();
    let mut rng = Rng(42);
    let q = normalise((0..8).map(|_| rng.normal()).collect());
    let away = normalise(q.iter().map(|x| -f64::from(*x) + 0.01).collect());
    let mut requests = Vec::new();
    // Meaning-only: the query's vector, unrelated words.
    let mut meaning = memory("quarterly budget spreadsheet review");
    meaning.embedding = q.clone();
    requests.push(create(meaning));
    // Keyword-only: the query's word, a distant vector.
    let mut keyword = memory("the zanzibar handshake protocol");
    keyword.embedding = away;
    requests.push(create(keyword));
    for i in 0..30 {
        let mut m = memory(&format!("filler note number {i} about gardening"));
        m.embedding = normalise((0..8).map(|_| rng.normal()).collect());
        requests.push(create(m));
    }
    client
        .batch_create_memories(pb::BatchCreateMemoriesRequest { requests, ..Default::default() })
        .await
        .expect("batch");

    let out = client
        .search_memories(pb::SearchMemoriesRequest {
            query: "zanzibar".into(),
            query_embedding: q.clone(),
            top_k: 3,
            ..Default::default()
        })
        .await
        .expect("hybrid")
        .into_inner();
    assert_eq!(out.mode, pb::SearchMode::Hybrid as i32, "text + vector defaults to HYBRID");
    let contents: Vec<&str> =
        out.results.iter().filter_map(|r| r.memory.as_ref().map(|m| m.content.as_str())).collect();
    assert!(contents.contains(&"quarterly budget spreadsheet review"), "{contents:?}");
    assert!(contents.contains(&"the zanzibar handshake protocol"), "{contents:?}");
    let kw =
        out.results.iter().find(|r| r.memory.as_ref().is_some_and(|m| m.content.contains("zanzibar"))).expect("kw");
    assert_eq!(kw.keyword_rank, Some(1));
    let sem =
        out.results.iter().find(|r| r.memory.as_ref().is_some_and(|m| m.content.contains("budget"))).expect("sem");
    assert_eq!(sem.semantic_rank, Some(1));
    assert!(sem.keyword_rank.is_none());

    // KEYWORD alone finds only the word match.
    let kw_only = client
        .search_memories(pb::SearchMemoriesRequest {
            query: "zanzibar".into(),
            mode: pb::SearchMode::Keyword as i32,
            ..Default::default()
        })
        .await
        .expect("keyword")
        .into_inner();
    assert_eq!(kw_only.results.len(), 1);
    app.stop().await.expect("stop");
}

/// Stored vectors are read only when a search needs them: MMR (`diversity`) re-ranks with them,
/// the FULL view returns them, and a plain search returns none.
#[tokio::test]
async fn diversity_and_the_full_view_read_the_stored_vectors() {
    let env = test_env();
    let db = fresh_database(&env).await;
    let app = spawn_secure(&db, &[("TMWS_EMBEDDING_PROVIDER", "none"), ("TMWS_EMBEDDING_DIMENSION", "8")]).await;
    let mut client = app.memory();
    let axis = |weights: &[(usize, f64)]| {
        let mut v = vec![0.0; 8];
        for (i, w) in weights {
            v[*i] = *w;
        }
        normalise(v)
    };
    let q = axis(&[(0, 1.0)]);
    // `near` is the best match, `twin` almost the same vector (similarity 0.9999 to `near`),
    // `other` a weaker match in another direction (0.89 to the query and to `near`).
    let vectors = [
        ("near", axis(&[(0, 1.0), (1, 0.05)])),
        ("twin", axis(&[(0, 1.0), (1, 0.06), (2, 0.01)])),
        ("other", axis(&[(0, 1.0), (3, 0.5)])),
    ];
    let requests = vectors
        .iter()
        .map(|(content, v)| {
            let mut m = memory(content);
            m.embedding = v.clone();
            create(m)
        })
        .collect();
    client
        .batch_create_memories(pb::BatchCreateMemoriesRequest { requests, ..Default::default() })
        .await
        .expect("batch");

    let run = |diversity: Option<f64>, with_embedding: bool| {
        let mut client = client.clone();
        let view = if with_embedding { pb::MemoryView::Full } else { pb::MemoryView::Basic } as i32;
        let request = pb::SearchMemoriesRequest { diversity, view, ..search(&q, 2, false, None) };
        async move { client.search_memories(request).await.expect("search").into_inner().results }
    };
    let contents = |results: &[pb::SearchResult]| -> Vec<String> {
        results.iter().filter_map(|r| r.memory.as_ref().map(|m| m.content.clone())).collect()
    };

    let plain = run(None, false).await;
    assert_eq!(contents(&plain), ["near", "twin"], "relevance order");
    assert!(plain.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.embedding.is_empty())), "no vectors unasked");

    // MMR sees that `twin` repeats `near` (without the vectors it would count them as unrelated).
    let diverse = run(Some(0.95), false).await;
    assert_eq!(contents(&diverse), ["near", "other"], "diversity re-ranks by the stored vectors");
    assert!(diverse.iter().all(|r| r.memory.as_ref().is_some_and(|m| m.embedding.is_empty())));

    for diversity in [None, Some(0.95)] {
        let with = run(diversity, true).await;
        for r in &with {
            let m = r.memory.as_ref().expect("memory");
            let stored = &vectors.iter().find(|(c, _)| *c == m.content).expect("known").1;
            assert_eq!(&m.embedding, stored, "the FULL view returns the stored vector (diversity {diversity:?})");
        }
    }
    app.stop().await.expect("stop");
}
