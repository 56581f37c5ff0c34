//! Server TLS (rustls with ring) and optional client-certificate verification (mTLS).

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::config::TlsConfig;

/// The server's TLS configuration, or `None` when `TMWS_TLS_CERT` is unset. With
/// `TMWS_TLS_CLIENT_CA`, every client must present a certificate signed by that CA.
pub fn server_tls(cfg: &TlsConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert_path), Some(key_path)) = (&cfg.cert, &cfg.key) else { return Ok(None) };
    let cert =
        std::fs::read(cert_path).with_context(|| format!("TMWS_TLS_CERT: cannot read {}", cert_path.display()))?;
    let key = std::fs::read(key_path).with_context(|| format!("TMWS_TLS_KEY: cannot read {}", key_path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&cert).contains("-----BEGIN CERTIFICATE-----"),
        "TMWS_TLS_CERT: {} is not a PEM certificate",
        cert_path.display()
    );
    anyhow::ensure!(
        String::from_utf8_lossy(&key).contains("PRIVATE KEY-----"),
        "TMWS_TLS_KEY: {} is not a PEM private key",
        key_path.display()
    );
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca_path) = &cfg.client_ca {
        let ca =
            std::fs::read(ca_path).with_context(|| format!("TMWS_TLS_CLIENT_CA: cannot read {}", ca_path.display()))?;
        anyhow::ensure!(
            String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----"),
            "TMWS_TLS_CLIENT_CA: {} is not a PEM certificate bundle",
            ca_path.display()
        );
        tls = tls.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(false);
    }
    Ok(Some(tls))
}
