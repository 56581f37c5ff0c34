//! The Prometheus endpoint: `GET /metrics` on `TMWS_METRICS_ADDR` (a small HTTP/1.1 listener,
//! off unless configured).

use std::{convert::Infallible, net::SocketAddr};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::metrics::metrics;

async fn handle(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(metrics().render_prometheus()))),
        (&hyper::Method::GET, "/") => {
            Response::builder().body(Full::new(Bytes::from_static(b"tmws metrics: /metrics\n")))
        }
        _ => Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n"))),
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Binds `addr` and serves `/metrics` until `stop` turns true. Returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (TMWS_METRICS_ADDR): {e}"))?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(async move {
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                    });
                }
                _ = stop.changed() => break,
            }
        }
    });
    Ok((local, handle))
}
