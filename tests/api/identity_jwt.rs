//! JWT authentication: HS256 with the server secret and ES256 with a configured public key.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tonic::Code;

use crate::common::{TEST_SECRET_KEY, spawn_app_auth, with_key};
use tmws::pb;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hs256(claims: Value, secret: &str) -> String {
    tmws::auth::jwt::install_crypto_provider();
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
}

#[tokio::test]
async fn hs256_tokens_name_known_active_agents() {
    let app = spawn_app_auth(&[("TMWS_JWT_HS256", "true"), ("TMWS_JWT_ISSUER", "sso.test")]).await;
    app.create_agent("alice", "red", "agent").await;
    let a = app.agents();
    let who = |token: String| {
        let mut a = a.clone();
        async move { a.who_am_i(with_key(pb::WhoAmIRequest {}, &token)).await }
    };

    let good = hs256(json!({"sub": "alice", "exp": now() + 300, "iss": "sso.test"}), TEST_SECRET_KEY);
    let me = who(good.clone()).await.expect("valid JWT").into_inner();
    assert_eq!(me.credential_type, "jwt");
    let agent = me.agent.unwrap();
    assert_eq!((agent.id.as_str(), agent.namespace.as_str()), ("alice", "red"), "namespace from the database");

    // Claims cannot smuggle a namespace or a role.
    let sneaky = hs256(
        json!({"sub": "alice", "exp": now() + 300, "iss": "sso.test", "namespace": "blue", "role": "admin"}),
        TEST_SECRET_KEY,
    );
    let agent = who(sneaky).await.expect("valid").into_inner().agent.unwrap();
    assert_eq!((agent.namespace.as_str(), agent.role), ("red", pb::Role::Agent as i32));
    // A `scope` claim narrows.
    let narrow =
        hs256(json!({"sub": "alice", "exp": now() + 300, "iss": "sso.test", "scope": "memory:read"}), TEST_SECRET_KEY);
    assert_eq!(who(narrow.clone()).await.unwrap().into_inner().scopes, vec!["memory:read".to_string()]);
    let s = app
        .memory()
        .create_memory(with_key(crate::memory::create(crate::memory::memory("x")), &narrow))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Wrong signature, alg none, expired, unknown sub, wrong issuer, missing exp.
    let wrong_key = hs256(
        json!({"sub": "alice", "exp": now() + 300, "iss": "sso.test"}),
        "another-secret-entirely-0123456789abcdef",
    );
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": now() + 300, "iss": "sso.test"}).to_string());
    let none_alg = format!("{header}.{body}.");
    let expired = hs256(json!({"sub": "alice", "exp": now() - 3600, "iss": "sso.test"}), TEST_SECRET_KEY);
    let unknown = hs256(json!({"sub": "mallory", "exp": now() + 300, "iss": "sso.test"}), TEST_SECRET_KEY);
    let wrong_iss = hs256(json!({"sub": "alice", "exp": now() + 300, "iss": "evil"}), TEST_SECRET_KEY);
    let no_exp = hs256(json!({"sub": "alice", "iss": "sso.test"}), TEST_SECRET_KEY);
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": now() + 300, "iss": "sso.test"}).to_string()),
        parts[2]
    );
    for (name, token) in [
        ("wrong signature", wrong_key),
        ("alg none", none_alg),
        ("expired", expired),
        ("unknown sub", unknown),
        ("wrong issuer", wrong_iss),
        ("no exp", no_exp),
        ("tampered claims", tampered),
    ] {
        let s = who(token).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{name}: {s:?}");
    }

    // A suspended sub is refused.
    app.agents()
        .update_agent(app.admin(pb::UpdateAgentRequest {
            agent: Some(pb::Agent {
                id: "alice".into(),
                status: pb::AgentStatus::Suspended as i32,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("suspend");
    let s = who(good).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn jwts_are_refused_when_not_configured() {
    let app = spawn_app_auth(&[]).await;
    app.create_agent("alice", "red", "agent").await;
    let token = hs256(json!({"sub": "alice", "exp": now() + 300}), TEST_SECRET_KEY);
    let s = app.agents().who_am_i(with_key(pb::WhoAmIRequest {}, &token)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    app.stop().await.expect("stop");
}

#[tokio::test]
async fn es256_tokens_with_a_configured_public_key() {
    let pair = rcgen::KeyPair::generate().expect("P-256 key");
    let dir = std::env::temp_dir().join(format!("tmws-jwt-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("jwt-public.pem");
    std::fs::write(&pem, pair.public_key_pem()).unwrap();
    let app = spawn_app_auth(&[("TMWS_JWT_PUBLIC_KEY_FILE", pem.to_str().unwrap())]).await;
    app.create_agent("bob", "blue", "readonly").await;

    tmws::auth::jwt::install_crypto_provider();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::ES256), &json!({"sub": "bob", "exp": now() + 300}), &key).unwrap();
    let me = app.agents().who_am_i(with_key(pb::WhoAmIRequest {}, &token)).await.expect("ES256 JWT").into_inner();
    assert_eq!(me.agent.unwrap().role, pb::Role::Readonly as i32);

    // Another key pair's signature; HS256 (not configured here, and signed with the public key
    // bytes: the classic algorithm confusion).
    let other = rcgen::KeyPair::generate().unwrap();
    let forged = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "bob", "exp": now() + 300}),
        &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let confused = hs256(json!({"sub": "bob", "exp": now() + 300}), &pair.public_key_pem());
    for token in [forged, confused] {
        let s = app.agents().who_am_i(with_key(pb::WhoAmIRequest {}, &token)).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
    app.stop().await.expect("stop");
    let _ = std::fs::remove_dir_all(dir);
}
