//! The `ollama` protocol: Ollama's native `POST {url}/api/embed`.

use serde::{Deserialize, Serialize};

/// The endpoint for a base URL; a base that already ends in `/api` is not given a second one.
pub(super) fn endpoint(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/api") { format!("{base}/embed") } else { format!("{base}/api/embed") }
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a [&'a str],
}

pub(super) fn request_body(model: &str, texts: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&Request { model, input: texts }).expect("serialising strings to JSON cannot fail")
}

#[derive(Deserialize)]
struct Response {
    embeddings: Vec<Vec<f32>>,
}

/// Parses `{"embeddings": [[...], ...]}`. Counts and dimensions are checked by the caller.
pub(super) fn parse_response(body: &[u8]) -> Result<Vec<Vec<f32>>, String> {
    let response: Response =
        serde_json::from_slice(body).map_err(|e| format!("not an Ollama /api/embed response: {e}"))?;
    Ok(response.embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_and_body() {
        assert_eq!(endpoint("http://127.0.0.1:11434"), "http://127.0.0.1:11434/api/embed");
        assert_eq!(endpoint("http://127.0.0.1:11434/api/"), "http://127.0.0.1:11434/api/embed");
        let body: serde_json::Value = serde_json::from_slice(&request_body("nomic", &["x"])).unwrap();
        assert_eq!(body, serde_json::json!({"model": "nomic", "input": ["x"]}));
    }

    #[test]
    fn parses_embeddings() {
        let body = br#"{"model":"m","embeddings":[[0.5,-0.5],[1,2]],"total_duration":1}"#;
        assert_eq!(parse_response(body).unwrap(), vec![vec![0.5, -0.5], vec![1.0, 2.0]]);
        assert!(parse_response(br#"{"embedding":[1.0]}"#).is_err());
        assert!(parse_response(br#"{"error":"model not found"}"#).is_err());
    }
}
