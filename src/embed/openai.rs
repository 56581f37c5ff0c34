//! The `openai` protocol: `POST {url}/v1/embeddings`, as spoken by OpenAI and by most local
//! servers (Text Embeddings Inference, vLLM, Ollama's `/v1` API, LM Studio, llama.cpp).

use serde::{Deserialize, Serialize};

/// The endpoint for a base URL; a base that already ends in `/v1` is not given a second one.
pub(super) fn endpoint(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") { format!("{base}/embeddings") } else { format!("{base}/v1/embeddings") }
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a [&'a str],
    encoding_format: &'static str,
}

pub(super) fn request_body(model: &str, texts: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&Request { model, input: texts, encoding_format: "float" })
        .expect("serialising strings to JSON cannot fail")
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// Parses `{"data": [{"index": i, "embedding": [...]}, ...]}` into vectors ordered by `index`
/// (entries without any `index` are taken in order). Counts and dimensions are checked by the
/// caller.
pub(super) fn parse_response(body: &[u8]) -> Result<Vec<Vec<f32>>, String> {
    let response: Response =
        serde_json::from_slice(body).map_err(|e| format!("not an OpenAI embeddings response: {e}"))?;
    let n = response.data.len();
    let indexed = response.data.iter().filter(|item| item.index.is_some()).count();
    if indexed == 0 {
        return Ok(response.data.into_iter().map(|item| item.embedding).collect());
    }
    if indexed != n {
        return Err("some entries of data have an index and some do not".into());
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; n];
    for item in response.data {
        let index = item.index.unwrap_or_default();
        match slots.get_mut(index) {
            None => return Err(format!("index {index} out of range for {n} entries")),
            Some(Some(_)) => return Err(format!("index {index} appears twice")),
            Some(slot) => *slot = Some(item.embedding),
        }
    }
    // n entries with n distinct indices below n: every slot is filled.
    Ok(slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_bases_with_and_without_v1() {
        assert_eq!(endpoint("http://h:8080"), "http://h:8080/v1/embeddings");
        assert_eq!(endpoint("http://h:8080/"), "http://h:8080/v1/embeddings");
        assert_eq!(endpoint("http://h:11434/v1"), "http://h:11434/v1/embeddings");
        assert_eq!(endpoint("https://api.example.com/v1/"), "https://api.example.com/v1/embeddings");
        assert_eq!(endpoint("http://h/proxy"), "http://h/proxy/v1/embeddings");
    }

    #[test]
    fn request_body_has_the_openai_shape() {
        let body: serde_json::Value = serde_json::from_slice(&request_body("m", &["a", "b"])).unwrap();
        assert_eq!(body, serde_json::json!({"model": "m", "input": ["a", "b"], "encoding_format": "float"}));
    }

    #[test]
    fn response_is_ordered_by_index() {
        let body = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":[0.0,1.0]},
            {"object":"embedding","index":0,"embedding":[1,0]}],"model":"m","usage":{}}"#;
        assert_eq!(parse_response(body).unwrap(), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let unindexed = br#"{"data":[{"embedding":[1.0]},{"embedding":[2.0]}]}"#;
        assert_eq!(parse_response(unindexed).unwrap(), vec![vec![1.0], vec![2.0]]);
    }

    #[test]
    fn malformed_responses_are_rejected() {
        for body in [
            &br#"{"data":[{"index":0,"embedding":[1.0]},{"index":0,"embedding":[2.0]}]}"#[..],
            br#"{"data":[{"index":2,"embedding":[1.0]}]}"#,
            br#"{"data":[{"index":0,"embedding":[1.0]},{"embedding":[2.0]}]}"#,
            br#"{"data":[{"index":0,"embedding":"AAAA"}]}"#,
            br#"{"data":[{"index":0,"embedding":[NaN]}]}"#,
            br#"{"error":{"message":"nope"}}"#,
            b"not json",
        ] {
            assert!(parse_response(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
