//! A real HTTP/1.1 embedding server on `127.0.0.1:0` for tests, speaking both protocols:
//!
//! - `POST /v1/embeddings` (OpenAI): `{"model", "input": [..]}` (or a single string) ->
//!   `{"object":"list","data":[{"object":"embedding","index":i,"embedding":[..]}],"model",...}`;
//! - `POST /api/embed` (Ollama): `{"model", "input": [..]}` (or a single string) ->
//!   `{"model","embeddings":[[..], ..]}`.
//!
//! Vectors are [`tmws::embed::hash_embed`] of each text at the server's dimension, so tests can
//! compute the expected answer ([`EmbedServer::expected`]). Knobs and counters are shared,
//! thread-safe state; dropping the server (or [`EmbedServer::shutdown`]) stops it and closes
//! every connection.
#![allow(dead_code)]

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

/// One request as the server saw it (never includes the texts themselves, only their count).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    pub model: Option<String>,
    pub texts: usize,
    pub authorization: Option<String>,
    pub body: Option<Value>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    dim: AtomicUsize,
    /// Remaining forced failures and their status.
    fail: Mutex<(usize, u16)>,
    delay: Mutex<Duration>,
    wrong_dimension: AtomicBool,
    reverse_order: AtomicBool,
    api_key: Mutex<Option<String>>,
    /// Raw answers (status, body) served before anything else, one per request.
    raw: Mutex<VecDeque<(u16, String)>>,
    requests: AtomicUsize,
    texts_seen: AtomicUsize,
    seen: Mutex<Vec<SeenRequest>>,
}

pub struct EmbedServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl EmbedServer {
    /// Starts a server answering with vectors of `dim` components.
    pub async fn start(dim: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind embed server");
        let addr = listener.local_addr().expect("embed server address");
        let state = Arc::new(State::default());
        state.dim.store(dim, Ordering::SeqCst);
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Self { addr, state, task: Some(task) }
    }

    /// `http://127.0.0.1:port`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn dimension(&self) -> usize {
        self.state.dim.load(Ordering::SeqCst)
    }

    /// The vector the server answers for `text` (while `wrong_dimension` is off).
    pub fn expected(&self, text: &str) -> Vec<f32> {
        tmws::embed::hash_embed(text, self.dimension())
    }

    /// Answers the next `n` requests with HTTP `status` (and a small JSON error body).
    pub fn fail_next(&self, n: usize, status: u16) {
        *self.state.fail.lock().unwrap() = (n, status);
    }

    /// Waits this long before answering each request (including failures).
    pub fn delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Answers vectors of `dim + 1` components.
    pub fn wrong_dimension(&self, on: bool) {
        self.state.wrong_dimension.store(on, Ordering::SeqCst);
    }

    /// OpenAI answers list `data` in reverse order (each entry keeps its right `index`).
    pub fn reverse_order(&self, on: bool) {
        self.state.reverse_order.store(on, Ordering::SeqCst);
    }

    /// With `Some(key)`, requests without `Authorization: Bearer <key>` get 401, whose body echoes
    /// the header received (as some servers do), to check that clients keep keys out of errors.
    pub fn require_api_key(&self, key: Option<String>) {
        *self.state.api_key.lock().unwrap() = key;
    }

    /// Queues a raw answer: the next request not failed by `fail_next` gets exactly this.
    pub fn respond_raw(&self, status: u16, body: impl Into<String>) {
        self.state.raw.lock().unwrap().push_back((status, body.into()));
    }

    /// Requests received (every one, answered or not).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Texts received, over all requests whose body could be read.
    pub fn texts_seen(&self) -> usize {
        self.state.texts_seen.load(Ordering::SeqCst)
    }

    /// The number of texts of each request, in arrival order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.state.seen.lock().unwrap().iter().map(|r| r.texts).collect()
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<SeenRequest> {
        self.state.seen.lock().unwrap().last().cloned()
    }

    /// Stops accepting and closes every open connection.
    pub fn shutdown(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for EmbedServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connections live in this set: aborting the accept task drops it, which aborts them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn error(status: u16, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"error": {"message": message, "code": status}}).to_string())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).ok();
    let parsed: Option<Value> = body.as_deref().and_then(|b| serde_json::from_slice(b).ok());
    let texts: Option<Vec<String>> = parsed.as_ref().and_then(|v| match v.get("input")? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items.iter().map(|i| i.as_str().map(str::to_string)).collect(),
        _ => None,
    });
    if let Some(t) = &texts {
        state.texts_seen.fetch_add(t.len(), Ordering::SeqCst);
    }

    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let response = answer(&state, &method, &path, authorization.as_deref(), texts.as_deref());
    state.seen.lock().unwrap().push(SeenRequest {
        path,
        model: parsed.as_ref().and_then(|v| v.get("model")?.as_str().map(str::to_string)),
        texts: texts.as_ref().map_or(0, Vec::len),
        authorization,
        body: parsed,
        status: response.status().as_u16(),
    });
    Ok(response)
}

fn answer(
    state: &State,
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    texts: Option<&[String]>,
) -> Response<Full<Bytes>> {
    {
        let mut fail = state.fail.lock().unwrap();
        if fail.0 > 0 {
            fail.0 -= 1;
            return error(fail.1, "injected failure");
        }
    }
    if let Some((status, body)) = state.raw.lock().unwrap().pop_front() {
        return reply(status, body);
    }
    if let Some(key) = state.api_key.lock().unwrap().as_deref()
        && authorization != Some(format!("Bearer {key}").as_str())
    {
        return error(401, &format!("invalid api key in {:?}", authorization.unwrap_or("")));
    }
    if method != Method::POST {
        return error(405, "method not allowed");
    }
    let protocol_openai = match path {
        "/v1/embeddings" => true,
        "/api/embed" => false,
        _ => return error(404, "not found"),
    };
    let Some(texts) = texts else {
        return error(400, "expected a JSON body with input: string or array of strings");
    };
    let mut dim = state.dim.load(Ordering::SeqCst);
    if state.wrong_dimension.load(Ordering::SeqCst) {
        dim += 1;
    }
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| tmws::embed::hash_embed(t, dim)).collect();
    let body = if protocol_openai {
        let mut data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
            .collect();
        if state.reverse_order.load(Ordering::SeqCst) {
            data.reverse();
        }
        json!({"object": "list", "data": data, "model": "test", "usage": {"prompt_tokens": 0, "total_tokens": 0}})
    } else {
        json!({"model": "test", "embeddings": vectors, "total_duration": 0, "prompt_eval_count": 0})
    };
    reply(200, body.to_string())
}
