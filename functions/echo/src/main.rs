//! Echoes the request back as JSON: method, path, query, headers and body.
//!
//! The body comes back twice: `body` as text when it is UTF-8 (else null), and
//! `body_base64` always, so binary bodies can be compared byte for byte.
use std::collections::BTreeMap;

use base64::Engine as _;
use hearth_guest::prelude::*;

hearth_guest::handler!(echo);

#[derive(serde::Serialize)]
struct Echo {
    method: String,
    path: String,
    query: Option<String>,
    headers: BTreeMap<String, Vec<String>>,
    body: Option<String>,
    body_base64: String,
    body_len: usize,
}

async fn echo(mut request: Request<Body>) -> Result<Response<Body>> {
    let body = read_body(&mut request).await?;
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.headers() {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let echo = Echo {
        method: request.method().as_str().to_owned(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        headers,
        body_base64: base64::engine::general_purpose::STANDARD.encode(&body),
        body_len: body.len(),
        body: String::from_utf8(body).ok(),
    };
    Ok(json(StatusCode::OK, &echo))
}
