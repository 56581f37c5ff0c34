//! The built-in `hash` provider: a deterministic lexical embedder (model `tmws-hash-v1`).
//!
//! It needs no model server, and the same text always gets the same vector, on every platform and
//! in every release. It captures shared words and word forms, not meaning: use a real model
//! (`openai`, `ollama`) for semantic search.
//!
//! # The algorithm (changing any of it changes every vector: it would need a new model name)
//!
//! 1. **Words.** The text is split into words on every character that is not alphanumeric
//!    (Unicode `char::is_alphanumeric`); each word is lowercased with Unicode rules
//!    (`str::to_lowercase`).
//! 2. **Features**, each a byte string starting with a one-byte tag, and a weight:
//!    - every word `w`: `"w" + w`, weight 1.0 (repeated words add up);
//!    - every pair of adjacent words `a b`: `"b" + a + " " + b`, weight 0.5;
//!    - every character 3-gram `g` of every word padded as `^word$` (a word of `k` characters has
//!      `k` of them): `"c" + g`, weight `0.5 / sqrt(k)`, so that each word's 3-grams together
//!      weigh 0.5 (as a vector: their squared weights sum to 0.25), half as much as the word,
//!      whatever its length. They make word forms (`embedding`, `embeddings`) similar.
//!
//!    A text without any alphanumeric character instead gets one feature per non-whitespace
//!    character `c`: `"s" + c`, weight 1.0.
//! 3. **Hashing.** Each feature's UTF-8 bytes are hashed with 64-bit FNV-1a, followed by the
//!    MurmurHash3 `fmix64` finaliser (so that every bit of the result is well mixed): `h`.
//!    The feature adds `±weight` to component `h % dim`, negative when bit 63 of `h` is set
//!    (signed feature hashing: collisions cancel out on average instead of piling up).
//! 4. **Normalisation.** The vector is divided by its L2 norm (summing in `f64`, then rounding to
//!    `f32`). Should it be all zeros (an empty or whitespace-only text, or features cancelling out
//!    exactly), component `fmix64(fnv1a64("e" + text)) % dim` is set to 1.0 instead.
//!
//! Every vector is therefore finite, non-zero and of unit length. The only dependency on the Rust
//! release is Unicode's character tables (which characters are alphanumeric, how they lowercase),
//! and those change only for newly assigned characters.

/// 64-bit FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// 64-bit FNV prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

const TAG_WORD: u8 = b'w';
const TAG_BIGRAM: u8 = b'b';
const TAG_TRIGRAM: u8 = b'c';
const TAG_SYMBOL: u8 = b's';
const TAG_EMPTY: u8 = b'e';

const WORD_WEIGHT: f64 = 1.0;
const BIGRAM_WEIGHT: f64 = 0.5;
/// L2 weight of all of one word's character 3-grams together.
const TRIGRAMS_WEIGHT: f64 = 0.5;
const SYMBOL_WEIGHT: f64 = 1.0;

/// Incremental 64-bit FNV-1a.
#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(FNV_OFFSET)
    }

    fn write(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
        self
    }

    fn write_char(self, c: char) -> Self {
        let mut buf = [0u8; 4];
        self.write(c.encode_utf8(&mut buf).as_bytes())
    }

    fn finish(self) -> u64 {
        self.0
    }
}

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    Fnv1a::new().write(bytes).finish()
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

struct Accumulator {
    values: Vec<f64>,
}

impl Accumulator {
    fn add(&mut self, feature: Fnv1a, weight: f64) {
        let h = fmix64(feature.finish());
        let dim = self.values.len() as u64;
        let bucket = (h % dim) as usize;
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        self.values[bucket] += sign * weight;
    }
}

/// Embeds `text` into a unit vector of `dim` components (empty when `dim` is 0).
/// See the [module documentation](self) for the exact algorithm.
pub fn hash_embed(text: &str, dim: usize) -> Vec<f32> {
    if dim == 0 {
        return Vec::new();
    }
    let mut acc = Accumulator { values: vec![0.0; dim] };
    let words: Vec<String> =
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();

    for word in &words {
        acc.add(Fnv1a::new().write(&[TAG_WORD]).write(word.as_bytes()), WORD_WEIGHT);

        let padded: Vec<char> = std::iter::once('^').chain(word.chars()).chain(std::iter::once('$')).collect();
        let trigrams = padded.len() - 2; // == the word's length in characters, >= 1
        let weight = TRIGRAMS_WEIGHT / (trigrams as f64).sqrt();
        for gram in padded.windows(3) {
            let feature = gram.iter().fold(Fnv1a::new().write(&[TAG_TRIGRAM]), |h, &c| h.write_char(c));
            acc.add(feature, weight);
        }
    }
    for pair in words.windows(2) {
        let feature = Fnv1a::new().write(&[TAG_BIGRAM]).write(pair[0].as_bytes()).write(b" ").write(pair[1].as_bytes());
        acc.add(feature, BIGRAM_WEIGHT);
    }
    if words.is_empty() {
        for c in text.chars().filter(|c| !c.is_whitespace()) {
            acc.add(Fnv1a::new().write(&[TAG_SYMBOL]).write_char(c), SYMBOL_WEIGHT);
        }
    }

    let mut values = acc.values;
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        values.iter_mut().for_each(|v| *v /= norm);
    } else {
        values.iter_mut().for_each(|v| *v = 0.0);
        let h = fmix64(Fnv1a::new().write(&[TAG_EMPTY]).write(text.as_bytes()).finish());
        values[(h % dim as u64) as usize] = 1.0;
    }
    values.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn golden_values_are_stable() {
        // Pinned once: a change here changes every stored `tmws-hash-v1` vector.
        let v = hash_embed("Hello, world!", 16);
        let expected: [f32; 16] = GOLDEN_HELLO_WORLD_16;
        assert_eq!(v, expected, "hash embedder output changed: {v:?}");
        let v = hash_embed("The quick brown fox", 384);
        for (i, want) in GOLDEN_FOX_384 {
            assert_eq!(v[i], want, "component {i} changed");
        }
    }

    const GOLDEN_HELLO_WORLD_16: [f32; 16] = [
        0.0,
        -0.15420108,
        0.0,
        0.0,
        0.0,
        -0.15420108,
        0.0,
        -0.15420108,
        0.0,
        0.0,
        0.15420108,
        -0.3448041,
        -0.5354071,
        -0.15420108,
        0.0,
        -0.6896082,
    ];
    const GOLDEN_FOX_384: [(usize, f32); 6] =
        [(0, 0.0), (25, 0.09325048), (30, -0.4170288), (60, -0.2085144), (275, 0.4170288), (383, 0.0)];

    #[test]
    fn deterministic_and_case_insensitive() {
        let a = hash_embed("Memory about the deployment pipeline", 384);
        assert_eq!(a, hash_embed("Memory about the deployment pipeline", 384));
        assert_eq!(a, hash_embed("MEMORY about THE deployment   pipeline!", 384));
        assert_eq!(hash_embed("ÉCOLE Straße", 64), hash_embed("école straße", 64));
    }

    #[test]
    fn every_vector_has_unit_norm() {
        let long = "lorem ipsum dolor sit amet ".repeat(500);
        for text in ["", "   \n\t", "!!!", "a", "x y", "日本語のテキスト", "Hello, world!", long.as_str()] {
            for dim in [1, 2, 16, 384] {
                let v = hash_embed(text, dim);
                assert_eq!(v.len(), dim);
                assert!(v.iter().all(|x| x.is_finite()), "{text:?} {dim}");
                assert!((norm(&v) - 1.0).abs() < 1e-5, "{text:?} dim {dim}: norm {}", norm(&v));
            }
        }
    }

    #[test]
    fn dimension_is_honoured() {
        assert_eq!(hash_embed("some text", 384).len(), 384);
        assert_eq!(hash_embed("some text", 16).len(), 16);
        assert_eq!(hash_embed("some text", 1).len(), 1);
        assert!(hash_embed("some text", 0).is_empty());
    }

    #[test]
    fn word_order_matters_less_than_content() {
        let a = hash_embed("the cat sat on the mat", 384);
        let reordered = hash_embed("the mat sat on the cat", 384);
        let unrelated = hash_embed("quarterly revenue forecast spreadsheet", 384);
        let same_words = cosine(&a, &reordered);
        assert!(same_words > 0.8, "{same_words}");
        assert!(same_words < 1.0 - 1e-6, "bigrams should tell the two orders apart");
        assert!(same_words > cosine(&a, &unrelated) + 0.5);
    }

    #[test]
    fn shared_words_score_higher() {
        let q = hash_embed("postgres connection pool exhausted", 384);
        let related = hash_embed("the connection pool of postgres was exhausted at noon", 384);
        let unrelated = hash_embed("birthday cake recipe with strawberries", 384);
        let (r, u) = (cosine(&q, &related), cosine(&q, &unrelated));
        assert!(r > 0.4, "{r}");
        assert!(r > u + 0.3, "related {r}, unrelated {u}");
        // Word forms share character 3-grams.
        let plural = cosine(&hash_embed("embedding", 384), &hash_embed("embeddings", 384));
        let other = cosine(&hash_embed("embedding", 384), &hash_embed("giraffe", 384));
        assert!(plural > 0.1 && plural > other + 0.1, "plural {plural}, other {other}");
    }

    #[test]
    fn texts_without_words_get_distinct_non_zero_vectors() {
        let bangs = hash_embed("!!!", 384);
        let question = hash_embed("???", 384);
        let empty = hash_embed("", 384);
        let blank = hash_embed("   ", 384);
        for v in [&bangs, &question, &empty, &blank] {
            assert!(v.iter().any(|x| *x != 0.0));
        }
        assert_ne!(bangs, question);
        assert_ne!(empty, blank);
    }
}
