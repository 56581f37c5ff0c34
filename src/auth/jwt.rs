//! JWT authentication (optional): a mesh or an SSO can mint tokens for known agents.
//!
//! Accepted algorithms are exactly the configured ones: HS256 with `TMWS_SECRET_KEY` when
//! `TMWS_JWT_HS256=true`, and RS256 or ES256 with the public key(s) in
//! `TMWS_JWT_PUBLIC_KEY_FILE` (a PEM public key, or a JWKS document whose keys are selected by
//! `kid`). `alg: none` and every other algorithm are rejected; `exp` and `sub` are required,
//! `nbf` is honoured, and `iss`/`aud` are checked when `TMWS_JWT_ISSUER`/`TMWS_JWT_AUDIENCE` are
//! set. The token only names the agent: its namespace, role and status come from the database.
//! An optional `scope` claim (space-separated) can narrow the agent's scopes, never widen them.
//!
//! The signature arithmetic is done by `ring` (the TLS stack's library) through a small
//! [`CryptoProvider`] for the `jsonwebtoken` crate.

use std::{collections::HashMap, path::Path, time::Duration};

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey, Validation,
    crypto::{CryptoProvider, JwtSigner, JwtVerifier as JwtVerifierTrait, KeyUtils},
    errors::{ErrorKind, Result as JwtResult},
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
    signature::{self, Signer, Verifier},
};
use ring::{hmac, rand::SystemRandom, signature as sig};
use serde::Deserialize;

use super::{Scope, Scopes};

/// JWT settings (`TMWS_JWT_*`).
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    /// Accept HS256 tokens signed with `TMWS_SECRET_KEY`.
    pub hs256: bool,
    /// A PEM public key (RSA or P-256) or a JWKS document.
    pub public_key_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl JwtConfig {
    pub fn enabled(&self) -> bool {
        self.hs256 || self.public_key_file.is_some()
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    /// `Some` when the token narrows the agent's scopes.
    pub scopes: Option<Scopes>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
}

/// Verifies tokens against the configured keys.
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    /// (algorithm, key id) -> key; the key id is `None` for a PEM key.
    public: HashMap<(Algorithm, Option<String>), DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hs256.is_some())
            .field("public_keys", &self.public.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// `None` when JWT authentication is not configured.
    pub fn from_config(cfg: &JwtConfig, secret_key: Option<&str>) -> anyhow::Result<Option<Self>> {
        install_crypto_provider();
        if !cfg.enabled() {
            return Ok(None);
        }
        let hs256 = if cfg.hs256 {
            let secret = secret_key.ok_or_else(|| anyhow::anyhow!("TMWS_JWT_HS256 needs TMWS_SECRET_KEY"))?;
            Some(DecodingKey::from_secret(secret.as_bytes())?)
        } else {
            None
        };
        let public = match &cfg.public_key_file {
            None => HashMap::new(),
            Some(path) => load_public_keys(path)
                .map_err(|e| anyhow::anyhow!("TMWS_JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))?,
        };
        Ok(Some(Self { hs256, public, issuer: cfg.issuer.clone(), audience: cfg.audience.clone(), leeway: cfg.leeway }))
    }

    /// Checks signature, algorithm and claims; the error is a message for UNAUTHENTICATED.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, String> {
        // An unknown algorithm (including "none") fails to parse here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed or unsupported JWT".to_string())?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 | Algorithm::ES256 => self
                .public
                .get(&(header.alg, header.kid.clone()))
                .or_else(|| if header.kid.is_some() { None } else { self.single_key(header.alg) })
                .or_else(|| self.public.get(&(header.alg, None))),
            _ => None,
        }
        .ok_or_else(|| format!("JWT algorithm {:?} (or key id) is not accepted by this server", header.alg))?;

        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "JWT has expired".to_string(),
            ErrorKind::ImmatureSignature => "JWT is not valid yet".to_string(),
            ErrorKind::InvalidSignature => "JWT signature is invalid".to_string(),
            ErrorKind::InvalidIssuer => "JWT issuer is not accepted".to_string(),
            ErrorKind::InvalidAudience => "JWT audience is not accepted".to_string(),
            ErrorKind::MissingRequiredClaim(c) => format!("JWT lacks the required claim {c}"),
            _ => "invalid JWT".to_string(),
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err("JWT sub is empty".into());
        }
        let scopes = claims.scope.map(|s| s.split_whitespace().filter_map(Scope::parse).collect::<Scopes>());
        Ok(VerifiedToken { subject: claims.sub, scopes })
    }

    fn single_key(&self, alg: Algorithm) -> Option<&DecodingKey> {
        let mut of_alg = self.public.iter().filter(|((a, _), _)| *a == alg);
        match (of_alg.next(), of_alg.next()) {
            (Some((_, key)), None) => Some(key),
            _ => None,
        }
    }
}

fn load_public_keys(path: &Path) -> anyhow::Result<HashMap<(Algorithm, Option<String>), DecodingKey>> {
    let raw = std::fs::read(path)?;
    let text = String::from_utf8_lossy(&raw);
    let mut out = HashMap::new();
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not a JWKS document: {e}"))?;
        for jwk in &set.keys {
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                // Keys for other algorithms are ignored: they can never verify an accepted token.
                _ => continue,
            };
            out.insert((alg, jwk.common.key_id.clone()), DecodingKey::from_jwk(jwk)?);
        }
        anyhow::ensure!(!out.is_empty(), "the JWKS has no RS256 or ES256 (P-256) key");
    } else if text.contains("BEGIN RSA PUBLIC KEY") || text.contains("BEGIN PUBLIC KEY") {
        let key = DecodingKey::from_rsa_pem(&raw)
            .map(|k| (Algorithm::RS256, k))
            .or_else(|_| DecodingKey::from_ec_pem(&raw).map(|k| (Algorithm::ES256, k)))
            .map_err(|_| anyhow::anyhow!("not an RSA or EC public key in PEM form"))?;
        if key.0 == Algorithm::ES256 {
            // Only P-256 points (65 bytes uncompressed) are accepted for ES256.
            anyhow::ensure!(
                matches!(key.1.kind(), DecodingKeyKind::SecretOrDer(b) if b.len() == 65),
                "only P-256 EC keys are supported (ES256)"
            );
        }
        out.insert((key.0, None), key.1);
    } else {
        anyhow::bail!("expected a PEM public key or a JWKS document");
    }
    Ok(out)
}

// ---- the ring-backed crypto provider ----------------------------------------------------------

static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes `ring` the process-wide JWT crypto provider (idempotent).
pub fn install_crypto_provider() {
    // Fails only when already installed, which is what we want.
    let _ = RING_PROVIDER.install_default();
}

fn sig_error<E>(_: E) -> signature::Error {
    signature::Error::new()
}

struct HmacSigner(hmac::Key);
impl Signer<Vec<u8>> for HmacSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}
impl JwtSigner for HmacSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

struct EcdsaSigner(sig::EcdsaKeyPair);
impl Signer<Vec<u8>> for EcdsaSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(self.0.sign(&SystemRandom::new(), msg).map_err(sig_error)?.as_ref().to_vec())
    }
}
impl JwtSigner for EcdsaSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

struct RsaSigner(sig::RsaKeyPair);
impl Signer<Vec<u8>> for RsaSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut out = vec![0; self.0.public().modulus_len()];
        self.0.sign(&sig::RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut out).map_err(sig_error)?;
        Ok(out)
    }
}
impl JwtSigner for RsaSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> JwtResult<Box<dyn JwtSigner>> {
    match (alg, key.family()) {
        (Algorithm::HS256, AlgorithmFamily::Hmac) => {
            Ok(Box::new(HmacSigner(hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()))))
        }
        (Algorithm::ES256, AlgorithmFamily::Ec) => Ok(Box::new(EcdsaSigner(
            sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, key.as_bytes(), &SystemRandom::new())
                .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        ))),
        (Algorithm::RS256, AlgorithmFamily::Rsa) => Ok(Box::new(RsaSigner(
            sig::RsaKeyPair::from_der(key.as_bytes()).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?,
        ))),
        (Algorithm::HS256 | Algorithm::ES256 | Algorithm::RS256, _) => Err(ErrorKind::InvalidKeyFormat.into()),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

struct HmacVerifier(hmac::Key);
impl Verifier<Vec<u8>> for HmacVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        // ring compares in constant time.
        hmac::verify(&self.0, msg, signature).map_err(sig_error)
    }
}
impl JwtVerifierTrait for HmacVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

struct PublicKeyVerifier {
    alg: Algorithm,
    key: DecodingKey,
}
impl Verifier<Vec<u8>> for PublicKeyVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        match (self.alg, self.key.kind()) {
            (Algorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
                sig::UnparsedPublicKey::new(&sig::RSA_PKCS1_2048_8192_SHA256, der).verify(msg, signature)
            }
            (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(&sig::RSA_PKCS1_2048_8192_SHA256, msg, signature)
            }
            (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point).verify(msg, signature)
            }
            _ => return Err(signature::Error::new()),
        }
        .map_err(sig_error)
    }
}
impl JwtVerifierTrait for PublicKeyVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> JwtResult<Box<dyn JwtVerifierTrait>> {
    match (alg, key.family()) {
        (Algorithm::HS256, AlgorithmFamily::Hmac) => {
            Ok(Box::new(HmacVerifier(hmac::Key::new(hmac::HMAC_SHA256, key.try_get_as_bytes()?))))
        }
        (Algorithm::RS256, AlgorithmFamily::Rsa) | (Algorithm::ES256, AlgorithmFamily::Ec) => {
            Ok(Box::new(PublicKeyVerifier { alg: *alg, key: key.clone() }))
        }
        (Algorithm::HS256 | Algorithm::ES256 | Algorithm::RS256, _) => Err(ErrorKind::InvalidKeyFormat.into()),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Header, encode};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn hs_verifier() -> JwtVerifier {
        let cfg = JwtConfig { hs256: true, leeway: Duration::from_secs(5), ..Default::default() };
        JwtVerifier::from_config(&cfg, Some(SECRET)).unwrap().unwrap()
    }

    fn hs_token(claims: serde_json::Value, secret: &str) -> String {
        install_crypto_provider();
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn hs256_accepts_valid_and_rejects_the_rest() {
        let v = hs_verifier();
        let ok = v.verify(&hs_token(json!({"sub": "alice", "exp": now() + 60}), SECRET)).unwrap();
        assert_eq!(ok, VerifiedToken { subject: "alice".into(), scopes: None });
        let narrowed =
            v.verify(&hs_token(json!({"sub": "a", "exp": now() + 60, "scope": "memory:read bogus"}), SECRET));
        assert_eq!(narrowed.unwrap().scopes, Some(Scopes::from_iter([Scope::MemoryRead])));
        // Wrong key, expired, no exp, no sub, not yet valid.
        assert!(
            v.verify(&hs_token(json!({"sub": "alice", "exp": now() + 60}), "another-secret-0123456789-abcdefghij"))
                .is_err()
        );
        assert!(
            v.verify(&hs_token(json!({"sub": "alice", "exp": now() - 600}), SECRET)).unwrap_err().contains("expired")
        );
        assert!(v.verify(&hs_token(json!({"sub": "alice"}), SECRET)).is_err());
        assert!(v.verify(&hs_token(json!({"exp": now() + 60}), SECRET)).is_err());
        assert!(v.verify(&hs_token(json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}), SECRET)).is_err());
        // Tampered payload.
        let t = hs_token(json!({"sub": "alice", "exp": now() + 60}), SECRET);
        let parts: Vec<&str> = t.split('.').collect();
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let forged = URL_SAFE_NO_PAD.encode(json!({"sub": "root", "exp": now() + 60}).to_string());
        assert!(v.verify(&format!("{}.{}.{}", parts[0], forged, parts[2])).is_err());
    }

    #[test]
    fn alg_none_and_unconfigured_algorithms_are_rejected() {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let v = hs_verifier();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(json!({"sub": "alice", "exp": now() + 60}).to_string());
        assert!(v.verify(&format!("{header}.{body}.")).is_err());
        assert!(v.verify(&format!("{header}.{body}")).is_err());
        // HS384 is not configured.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        );
        if let Ok(t) = hs384 {
            assert!(v.verify(&t).is_err());
        }
        // An HS256 token is refused by a server that only has a public key (no key confusion).
        assert!(v.verify("not.a.jwt").is_err());
    }

    /// A public key and a token (exp 2100) signed once with its private key, which was then
    /// discarded: RS256 verification without any private key in the tree.
    const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA5WMlGJ0ELXF81KweYXOO
ADcmsATFAosy/WK3h/BJdqq9cggP33I+ZPxDUMoCT9JZ7PCKuq3quJMQ8vJ7uqEd
HCMb1dNJR4C5XfYLj2qZVdQSGK17BPuBRQvuFvfPzkTQSUCGohQG20lyNp9S/cq3
O+pGnzMQHk1elVB++Qib+hpJZYJwY7eAUnbdoeDGN9pGFfoL0Vz0kA0ALI407P+K
RY7Eq52wGsLh6gKA7ycoMbh7v1ShT7fJrHFueEkSGufKzWB4kb1zC9yt8EPAXimJ
N2QB96Cpl7eJbLvDN/+sADknItcIO20zVzT96fihjlEDKU9DqFPDaf3VKAUI+iOU
QwIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJyc2EtYWdlbnQiLCJleHAiOjQxMDI0NDQ4MDB9.wsnTZ_pu8_AB2heQhfu_iaqw07pVaSNsrBmPRcgO0l3--nfm-B8n29v8ODzWsNrrwXURluaKVVEFA24r0UQ5sEj5CTNP2C-FJ4fwhlMr8ZsD_g29hawU-6QiOy0NSpKBLD2LdWdWh-ZQlhXg6OGsYxOsMxRj1CwOlRwd71995go_k4lTgsaOL4WJoCrPYCdMnUu2wbzmcvm1K6m_ltIkt-E1dhYMGabQ2vMAQypju_GyoLWrnDWukTSFaHWgmVaorR_qTboa2aTXnYn9SJc9sUg-4NBqxjXiFgnpb4FMAZ_xjYslJGLu-wQaDVmbgez5-0u9MQFtgMnLxHy5HRa6Qw";

    #[test]
    fn rs256_with_a_pem_public_key() {
        install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("tmws-jwt-rs-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("rsa.pem");
        std::fs::write(&pem, RSA_PUBLIC_PEM).unwrap();
        let v = JwtVerifier::from_config(&JwtConfig { public_key_file: Some(pem), ..Default::default() }, None)
            .unwrap()
            .unwrap();
        assert_eq!(v.verify(RSA_TOKEN).unwrap().subject, "rsa-agent");
        // One changed signature character (well inside the signature, not padding bits).
        let mut bad: Vec<char> = RSA_TOKEN.chars().collect();
        let i = bad.len() - 20;
        bad[i] = if bad[i] == 'A' { 'B' } else { 'A' };
        let bad: String = bad.into_iter().collect();
        assert!(v.verify(&bad).is_err());
        // HS256 with the public key text as the secret (algorithm confusion) is refused.
        let confused = hs_token(json!({"sub": "rsa-agent", "exp": now() + 60}), RSA_PUBLIC_PEM);
        assert!(v.verify(&confused).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn es256_with_a_pem_public_key() {
        install_crypto_provider();
        let pair = rcgen::KeyPair::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("tmws-jwt-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("pub.pem");
        std::fs::write(&pem, pair.public_key_pem()).unwrap();
        let cfg = JwtConfig { public_key_file: Some(pem), ..Default::default() };
        let v = JwtVerifier::from_config(&cfg, None).unwrap().unwrap();
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let t = encode(&Header::new(Algorithm::ES256), &json!({"sub": "bob", "exp": now() + 60}), &key).unwrap();
        assert_eq!(v.verify(&t).unwrap().subject, "bob");
        // HS256 signed with the public key's bytes (algorithm confusion) is refused.
        let confused = hs_token(json!({"sub": "bob", "exp": now() + 60}), &pair.public_key_pem());
        assert!(v.verify(&confused).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
