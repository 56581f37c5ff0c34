//! API keys: `tmws_<key id>_<secret>`.
//!
//! The key id (16 lowercase hex characters, 64 random bits) is the visible, non-secret part used
//! to find the key's row; the secret (64 lowercase hex characters, 256 random bits from the
//! operating system) is stored only as its SHA-256 and compared in constant time. A high-entropy
//! random secret needs no slow password hash: nothing about it can be guessed.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "tmws_";
const KEY_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Shortest secret part accepted from outside (e.g. `TMWS_BOOTSTRAP_ADMIN_KEY`).
pub const MIN_SECRET_CHARS: usize = 32;

/// A freshly made key: the full string (shown once) and what is stored.
#[derive(Clone)]
pub struct NewKey {
    pub key_id: String,
    pub full: String,
    pub secret_hash: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// The two parts of a presented key.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
}

impl std::fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Makes a new random key.
pub fn generate() -> anyhow::Result<NewKey> {
    let mut id = [0u8; KEY_ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no randomness for an API key id: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness for an API key: {e}"))?;
    let key_id = hex(&id);
    let secret = hex(&secret);
    let full = format!("{KEY_PREFIX}{key_id}_{secret}");
    Ok(NewKey { secret_hash: hash_secret(&secret), key_id, full })
}

/// Splits `tmws_<key id>_<secret>`; `None` when the shape is wrong.
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (key_id, secret) = rest.split_once('_')?;
    let id_ok =
        (8..=64).contains(&key_id.len()) && key_id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    let secret_ok = (16..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic());
    (id_ok && secret_ok).then_some(ParsedKey { key_id, secret })
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time comparison of a presented secret with a stored hash.
pub fn verify(secret: &str, stored_hash: &[u8]) -> bool {
    let presented = hash_secret(secret);
    stored_hash.len() == presented.len() && bool::from(presented.ct_eq(stored_hash))
}

/// Rejects secrets that are too short or obviously not random (for keys supplied from outside).
pub fn check_external_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_SECRET_CHARS {
        return Err(format!("the secret part must be at least {MIN_SECRET_CHARS} characters"));
    }
    let mut distinct: Vec<u8> = secret.bytes().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 10 {
        return Err("the secret part is not random enough".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_verify() {
        let k = generate().expect("key");
        assert!(k.full.starts_with("tmws_"));
        let p = parse(&k.full).expect("parses");
        assert_eq!(p.key_id, k.key_id);
        assert!(verify(p.secret, &k.secret_hash));
        assert!(!verify("0000000000000000000000000000000000000000", &k.secret_hash));
        let other = generate().expect("key");
        assert_ne!(other.key_id, k.key_id);
        assert!(!format!("{k:?}").contains(p.secret));
    }

    #[test]
    fn malformed_keys() {
        for bad in [
            "",
            "tmws_",
            "tmws_abc",
            "tmws_ABCDEFGH_0123456789abcdef",
            "xyz_0123456789abcdef_0123456789abcdef",
            "tmws_0123456789abcdef_short",
            "tmws_01234567_has space in it......",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert!(check_external_secret("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_err());
        assert!(check_external_secret("0123456789abcdef0123456789abcdef").is_ok());
    }
}
