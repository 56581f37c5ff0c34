//! TLS and mTLS with certificates made by the test (a throwaway CA, server and client certs).

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tmws::{pb, server::RunningServer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{auth_config, fresh_database, random_api_key, test_env, with_key};

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn make_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &ca).unwrap();

    Pki {
        ca_pem: ca.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_string()
}

async fn connect(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap().connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls)?;
    }
    ep.connect().await
}

async fn health_ok(channel: Channel) -> bool {
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_ok()
}

/// Starts a TLS server and waits until a client with `tls` gets a health answer.
async fn start(extra: &[(&str, &str)], admin_key: &str, tls: ClientTlsConfig) -> RunningServer {
    let env = test_env();
    let db = fresh_database(&env).await;
    let server = RunningServer::start(auth_config(&db, env.redis(), admin_key, extra)).await.expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = connect(server.addr, Some(tls.clone())).await
            && health_ok(ch).await
        {
            return server;
        }
        assert!(!server.is_finished(), "server exited during start-up");
        assert!(tokio::time::Instant::now() < deadline, "TLS server did not answer within 30s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tls_serves_encrypted_calls_and_refuses_plaintext() {
    let pki = make_pki();
    let dir = std::env::temp_dir().join(format!("tmws-tls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = write(&dir, "server.pem", &pki.server_cert);
    let key = write(&dir, "server.key", &pki.server_key);
    let admin = random_api_key();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    let server = start(&[("TMWS_TLS_CERT", &cert), ("TMWS_TLS_KEY", &key)], &admin, tls.clone()).await;

    let channel = connect(server.addr, Some(tls)).await.expect("TLS connect");
    let me = pb::agent_service_client::AgentServiceClient::new(channel)
        .who_am_i(with_key(pb::WhoAmIRequest {}, &admin))
        .await
        .expect("authenticated call over TLS")
        .into_inner();
    assert_eq!(me.agent.unwrap().id, "admin");

    // Plaintext HTTP/2 to the TLS port gets no answer.
    let plain = connect(server.addr, None).await;
    let answered = match plain {
        Ok(ch) => health_ok(ch).await,
        Err(_) => false,
    };
    assert!(!answered, "a plaintext client must not be served");
    // A client that does not trust the server's CA refuses it.
    let other = make_pki();
    let untrusted =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&other.ca_pem)).domain_name("localhost");
    let answered = match connect(server.addr, Some(untrusted)).await {
        Ok(ch) => health_ok(ch).await,
        Err(_) => false,
    };
    assert!(!answered, "an untrusted server certificate must fail the handshake");
    server.stop().await.expect("stop");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = make_pki();
    let dir = std::env::temp_dir().join(format!("tmws-mtls-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = write(&dir, "server.pem", &pki.server_cert);
    let key = write(&dir, "server.key", &pki.server_key);
    let ca = write(&dir, "client-ca.pem", &pki.ca_pem);
    let admin = random_api_key();
    let base = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    let with_cert = base.clone().identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    let server = start(
        &[("TMWS_TLS_CERT", &cert), ("TMWS_TLS_KEY", &key), ("TMWS_TLS_CLIENT_CA", &ca)],
        &admin,
        with_cert.clone(),
    )
    .await;

    let channel = connect(server.addr, Some(with_cert)).await.expect("mTLS connect");
    pb::agent_service_client::AgentServiceClient::new(channel)
        .who_am_i(with_key(pb::WhoAmIRequest {}, &admin))
        .await
        .expect("client certificate accepted");

    // No client certificate, or one from another CA: no answer.
    let stranger = make_pki();
    let foreign = base.clone().identity(Identity::from_pem(&stranger.client_cert, &stranger.client_key));
    for (name, tls) in [("no client certificate", base), ("foreign client certificate", foreign)] {
        let answered = match connect(server.addr, Some(tls)).await {
            Ok(ch) => health_ok(ch).await,
            Err(_) => false,
        };
        assert!(!answered, "{name} must be refused");
    }
    server.stop().await.expect("stop");
    let _ = std::fs::remove_dir_all(dir);
}
