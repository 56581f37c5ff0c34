//! Synthetic data: clustered unit vectors (a mixture of Gaussians around random centroids),
//! Zipf-distributed tags and words, a held-out query set, and exact top-k ground truth by brute
//! force. Everything is a pure function of the seed, so two runs with the same options see the
//! same data.

/// xoshiro256** seeded through splitmix64: small, fast and reproducible everywhere.
#[derive(Clone)]
pub struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()], spare: None }
    }

    /// An independent stream for `label` (so adding a consumer never shifts another's numbers).
    pub fn derive(seed: u64, label: u64) -> Self {
        Self::new(seed ^ label.wrapping_mul(0xD605_0B5F_3A8C_2F47))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn gauss(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// Zipf over ranks 0..n with exponent s (rank 0 most frequent), by inverse CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in v {
            *x /= norm;
        }
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without fast-math.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

const SYLLABLES: [&str; 16] =
    ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fu", "gi", "ha", "ju", "be"];
pub const VOCABULARY: usize = 4096;

/// The `i`th pseudo-word (three syllables; 4096 distinct words).
pub fn word(i: usize) -> String {
    format!("{}{}{}", SYLLABLES[i % 16], SYLLABLES[(i / 16) % 16], SYLLABLES[(i / 256) % 16])
}

pub fn tag_name(i: usize) -> String {
    format!("t{i:03}")
}

/// Draws memories and queries from one fixed mixture.
pub struct Generator {
    pub dim: usize,
    pub clusters: usize,
    spread: f32,
    centroids: Vec<f32>,
    tag_zipf: Zipf,
    word_zipf: Zipf,
}

/// One synthetic memory.
pub struct Item {
    pub vector: Vec<f32>,
    pub tags: Vec<u16>,
    pub text: String,
}

pub const TAGS: usize = 200;
const WORDS_PER_TEXT: usize = 11;

impl Generator {
    pub fn new(seed: u64, dim: usize, clusters: usize, spread: f32) -> Self {
        let mut rng = Rng::derive(seed, 1);
        let mut centroids = vec![0f32; clusters * dim];
        for c in centroids.chunks_mut(dim) {
            for x in c.iter_mut() {
                *x = rng.gauss() as f32;
            }
            normalize(c);
        }
        Self {
            dim,
            clusters,
            spread,
            centroids,
            tag_zipf: Zipf::new(TAGS, 1.0),
            word_zipf: Zipf::new(VOCABULARY, 1.07),
        }
    }

    fn point(&self, rng: &mut Rng, cluster: usize) -> Vec<f32> {
        let c = &self.centroids[cluster * self.dim..(cluster + 1) * self.dim];
        let mut v: Vec<f32> = c.iter().map(|x| x + self.spread * rng.gauss() as f32).collect();
        normalize(&mut v);
        v
    }

    pub fn item(&self, rng: &mut Rng) -> Item {
        let cluster = rng.below(self.clusters);
        let vector = self.point(rng, cluster);
        let ntags = 1 + rng.below(3);
        let mut tags: Vec<u16> = Vec::with_capacity(ntags);
        for _ in 0..ntags {
            let t = self.tag_zipf.sample(rng) as u16;
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let mut text = format!("topic{cluster}");
        for _ in 0..WORDS_PER_TEXT {
            text.push(' ');
            text.push_str(&word(self.word_zipf.sample(rng)));
        }
        Item { vector, tags, text }
    }

    /// A held-out query: a fresh point of a random cluster, and a text naming the cluster's
    /// topic and one frequent word (for hybrid search).
    pub fn query(&self, rng: &mut Rng) -> (Vec<f32>, String) {
        let cluster = rng.below(self.clusters);
        let v = self.point(rng, cluster);
        let w = word(rng.below(20));
        (v, format!("topic{cluster} {w}"))
    }
}

/// The loaded data set and what is known about it.
pub struct Dataset {
    pub n: usize,
    pub dim: usize,
    pub vectors: Vec<f32>,
    pub tags: Vec<Vec<u16>>,
    pub texts: Vec<String>,
    pub queries: Vec<Vec<f32>>,
    pub query_texts: Vec<String>,
    /// The tag used for the filtered case (closest to 1% of the rows).
    pub filter_tag: u16,
    pub filter_rows: usize,
    /// Exact top-k (dataset indices) of each query, unfiltered and with the filter tag.
    pub truth: Vec<Vec<u32>>,
    pub truth_filtered: Vec<Vec<u32>>,
}

impl Dataset {
    pub fn generate(seed: u64, n: usize, dim: usize, clusters: usize, spread: f32, queries: usize) -> Self {
        let g = Generator::new(seed, dim, clusters, spread);
        let mut rng = Rng::derive(seed, 2);
        let mut vectors = Vec::with_capacity(n * dim);
        let mut tags = Vec::with_capacity(n);
        let mut texts = Vec::with_capacity(n);
        for _ in 0..n {
            let it = g.item(&mut rng);
            vectors.extend_from_slice(&it.vector);
            tags.push(it.tags);
            texts.push(it.text);
        }
        let mut qrng = Rng::derive(seed, 3);
        let (queries, query_texts): (Vec<_>, Vec<_>) = (0..queries).map(|_| g.query(&mut qrng)).unzip();
        // The tag whose frequency is closest to 1%.
        let mut counts = vec![0usize; TAGS];
        for t in &tags {
            for &x in t {
                counts[x as usize] += 1;
            }
        }
        let target = n as f64 * 0.01;
        let filter_tag = (0..TAGS)
            .min_by(|&a, &b| (counts[a] as f64 - target).abs().total_cmp(&(counts[b] as f64 - target).abs()))
            .unwrap_or(0) as u16;
        Self {
            n,
            dim,
            vectors,
            tags,
            texts,
            queries,
            query_texts,
            filter_tag,
            filter_rows: counts[filter_tag as usize],
            truth: Vec::new(),
            truth_filtered: Vec::new(),
        }
    }

    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Exact top-`k` by cosine (the vectors are unit length, so by dot product), over all rows
    /// and over the rows carrying the filter tag; queries split across the machine's threads.
    pub fn compute_truth(&mut self, k: usize) {
        let filtered_rows: Vec<u32> =
            (0..self.n).filter(|&i| self.tags[i].contains(&self.filter_tag)).map(|i| i as u32).collect();
        let all_rows: Vec<u32> = (0..self.n as u32).collect();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1);
        let this = &*self;
        let run = |rows: &[u32]| -> Vec<Vec<u32>> {
            let chunk = this.queries.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = this
                    .queries
                    .chunks(chunk)
                    .map(|qs| s.spawn(move || qs.iter().map(|q| this.top_k(q, rows, k)).collect::<Vec<_>>()))
                    .collect();
                handles.into_iter().flat_map(|h| h.join().expect("ground truth thread")).collect()
            })
        };
        let truth = run(&all_rows);
        let truth_filtered = run(&filtered_rows);
        self.truth = truth;
        self.truth_filtered = truth_filtered;
    }

    fn top_k(&self, q: &[f32], rows: &[u32], k: usize) -> Vec<u32> {
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for &i in rows {
            let s = dot(q, self.vector(i as usize));
            if best.len() < k || s > best[best.len() - 1].0 {
                let pos = best.partition_point(|(b, _)| *b >= s);
                best.insert(pos, (s, i));
                best.truncate(k);
            }
        }
        best.into_iter().map(|(_, i)| i).collect()
    }
}

/// |found ∩ truth| / min(k, |truth|).
pub fn recall(found: &[u32], truth: &[u32]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let hit = found.iter().filter(|f| truth.contains(f)).count();
    hit as f64 / truth.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 100];
        for _ in 0..10_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[90]);
    }

    #[test]
    fn truth_is_exact() {
        let mut d = Dataset::generate(1, 500, 16, 10, 0.1, 5);
        d.compute_truth(10);
        for (q, t) in d.queries.iter().zip(&d.truth) {
            let mut all: Vec<(f32, u32)> = (0..d.n).map(|i| (dot(q, d.vector(i)), i as u32)).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            let want: Vec<u32> = all.iter().take(10).map(|x| x.1).collect();
            assert_eq!(&want, t);
        }
    }
}
