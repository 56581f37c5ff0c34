//! Opaque, tamper-proof page tokens (AIP-158).
//!
//! A token is `base64url(payload) "." base64url(hmac)`: the payload holds the keyset cursor and
//! a fingerprint of the query that produced it; the HMAC-SHA256 (keyed by a secret shared by
//! every replica through the database) makes forged tokens detectable. A token presented with a
//! different query (filter, order, namespace, caller) is rejected.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::error::Error;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct PageTokens {
    mac: HmacSha256,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(<key>)")
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Payload<C> {
    /// Query fingerprint.
    q: String,
    /// Cursor.
    c: C,
}

/// A stable fingerprint of everything that defines a query.
pub fn fingerprint(query: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(query).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

impl PageTokens {
    pub fn new(key: &[u8]) -> anyhow::Result<Self> {
        let mac = HmacSha256::new_from_slice(key).map_err(|e| anyhow::anyhow!("page token key: {e}"))?;
        Ok(Self { mac })
    }

    fn mac(&self) -> HmacSha256 {
        self.mac.clone()
    }

    pub fn encode<C: Serialize>(&self, query: &impl Serialize, cursor: &C) -> String {
        let payload = Payload { q: fingerprint(query), c: cursor };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(&tag[..16]))
    }

    /// Decodes a token made by [`PageTokens::encode`] for the same query; INVALID_ARGUMENT otherwise.
    pub fn decode<C: DeserializeOwned>(&self, token: &str, query: &impl Serialize) -> Result<C, Error> {
        let invalid = |why: &str| Error::invalid("page_token", why.to_string());
        let (body, tag) = token.split_once('.').ok_or_else(|| invalid("malformed page token"))?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid("malformed page token"))?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let expected = mac.finalize().into_bytes();
        if tag.len() != 16 || !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..16], &tag[..])) {
            return Err(invalid("page token was not issued by this service"));
        }
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| invalid("malformed page token"))?;
        let payload: Payload<C> = serde_json::from_slice(&raw).map_err(|_| invalid("malformed page token"))?;
        if payload.q != fingerprint(query) {
            return Err(invalid("page token belongs to a different query (filter, order or namespace changed)"));
        }
        Ok(payload.c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let tokens = PageTokens::new(b"0123456789abcdef0123456789abcdef").expect("key");
        let q1 = ("list", "ns", vec!["a"]);
        let q2 = ("list", "ns", vec!["b"]);
        let t = tokens.encode(&q1, &(42i64, "x".to_string()));
        let c: (i64, String) = tokens.decode(&t, &q1).expect("round trip");
        assert_eq!(c, (42, "x".into()));
        assert!(tokens.decode::<(i64, String)>(&t, &q2).is_err(), "other query");
        let mut forged = t.clone();
        forged.replace_range(0..1, if &t[0..1] == "A" { "B" } else { "A" });
        assert!(tokens.decode::<(i64, String)>(&forged, &q1).is_err(), "forged body");
        assert!(tokens.decode::<(i64, String)>("garbage", &q1).is_err());
        let other_key = PageTokens::new(b"another key entirely, 32 bytes!!").expect("key");
        assert!(other_key.decode::<(i64, String)>(&t, &q1).is_err(), "other key");
    }
}
