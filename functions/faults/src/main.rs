//! A deliberately badly behaved function for the runtime's fault tests.
//! The path picks the fault:
//! - `/trap`: executes `unreachable` (a guest trap);
//! - `/loop`: spins forever (only the deadline stops it);
//! - `/membomb`: allocates until memory runs out;
//! - `/stack`: recurses until the stack overflows;
//! - `/stack-host`: recurses calling the host at every level, so host calls
//!   run with the guest's stack nearly exhausted;
//! - `/host-bomb?mb=N`: asks the host for N MiB of random bytes at a time,
//!   keeping them, until memory runs out (memory the host allocates and
//!   copies into the guest);
//! - `/sleep?ms=N`: sleeps N ms, then answers (a slow but well-behaved call);
//! - `/slow-body?ms=N`: sends the response head at once, then the body after
//!   N ms (lets tests observe an invocation in flight);
//! - `/no-content?ms=N`: answers 204 at once, then keeps running N ms
//!   (its empty body ends only then);
//! - `/sized?ms=N`: declares `content-length: 5`, sends all 5 bytes (and
//!   an empty frame) at once, then keeps its body open N ms more (the whole
//!   answer is out long before the body's last frame);
//! - `/fetch?url=U`: sends `GET U`, following up to five redirects, and
//!   answers 200 with the final status and body, or 502 with the error (an
//!   outgoing request the host refused);
//! - `/chatty?mb=N`: prints N MiB to stdout in 100-byte lines, then answers
//!   (a guest flooding the log);
//! - anything else: answers `ok`.
use hearth_guest::prelude::*;

hearth_guest::handler!(faults);

async fn faults(request: Request<Body>) -> Result<Response<Body>> {
    match request.uri().path() {
        "/trap" => std::process::abort(),
        "/loop" => spin(),
        "/membomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page so the memory is really committed.
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/stack" => {
            let depth = recurse(std::hint::black_box(1));
            Ok(text(StatusCode::OK, depth.to_string()))
        }
        "/stack-host" => {
            let depth = recurse_calling_host(std::hint::black_box(1));
            Ok(text(StatusCode::OK, depth.to_string()))
        }
        "/host-bomb" => {
            let mib = query(&request, "mb").unwrap_or(16);
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(wasip2::random::random::get_random_bytes(mib << 20));
                std::hint::black_box(&hoard);
            }
        }
        "/sleep" => {
            sleep(millis(&request)).await;
            Ok(text(StatusCode::OK, "slept\n"))
        }
        "/slow-body" => {
            let ms = millis(&request);
            let body = futures_lite::stream::once_future(async move {
                sleep(ms).await;
                Ok::<_, std::convert::Infallible>(hearth_guest::wstd::http::body::Bytes::from_static(b"done\n"))
            });
            Ok(Response::new(Body::from_try_stream(body)))
        }
        "/no-content" => {
            let ms = millis(&request);
            let body = futures_lite::stream::once_future(async move {
                sleep(ms).await;
                Ok::<_, std::convert::Infallible>(hearth_guest::wstd::http::body::Bytes::new())
            });
            let mut response = Response::new(Body::from_try_stream(body));
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
        "/sized" => {
            use futures_lite::StreamExt as _;
            let ms = millis(&request);
            // The whole answer, and an empty frame at once: a server that
            // held only the frame reaching the length could let it go now.
            let whole = futures_lite::stream::iter([
                Ok::<_, std::convert::Infallible>(hearth_guest::wstd::http::body::Bytes::from_static(b"done\n")),
                Ok(hearth_guest::wstd::http::body::Bytes::new()),
            ]);
            let linger = futures_lite::stream::once_future(async move {
                sleep(ms).await;
                Ok(hearth_guest::wstd::http::body::Bytes::new())
            });
            let mut response = Response::new(Body::from_try_stream(whole.chain(linger)));
            response.headers_mut().insert(
                "content-length",
                hearth_guest::wstd::http::HeaderValue::from_static("5"),
            );
            Ok(response)
        }
        "/fetch" => fetch(&request).await,
        "/chatty" => {
            use std::io::Write as _;
            let mib = query(&request, "mb").unwrap_or(1);
            let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
            let mut out = std::io::stdout().lock();
            for _ in 0..(mib << 20) / 100 {
                // A full log is the host's to drop; the guest keeps going.
                let _ = out.write_all(&line);
            }
            let _ = out.flush();
            Ok(text(StatusCode::OK, "printed\n"))
        }
        _ => Ok(text(StatusCode::OK, "ok\n")),
    }
}

async fn fetch(request: &Request<Body>) -> Result<Response<Body>> {
    let mut url = request
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("url="))
        .unwrap_or_default()
        .to_owned();
    // Follows up to five redirects, each a new request the host checks.
    for _ in 0..=5 {
        let outgoing = match Request::get(url.as_str()).body(Body::empty()) {
            Ok(outgoing) => outgoing,
            Err(err) => return Ok(text(StatusCode::BAD_REQUEST, format!("bad url {url}: {err}\n"))),
        };
        let mut response = match hearth_guest::wstd::http::Client::new().send(outgoing).await {
            Ok(response) => response,
            Err(err) => return Ok(text(StatusCode::BAD_GATEWAY, format!("{err:?}\n"))),
        };
        let status = response.status();
        let location = response.headers().get("location").and_then(|l| l.to_str().ok());
        if let (true, Some(location)) = (status.is_redirection(), location) {
            url = location.to_owned();
            continue;
        }
        let body = response
            .body_mut()
            .str_contents()
            .await
            .map(str::to_owned)
            .unwrap_or_default();
        return Ok(text(StatusCode::OK, format!("{}\n{body}", status.as_u16())));
    }
    Ok(text(StatusCode::BAD_GATEWAY, "too many redirects\n"))
}

fn millis(request: &Request<Body>) -> u64 {
    query(request, "ms").unwrap_or(100)
}

/// The number in `name=N` in the query.
fn query(request: &Request<Body>, name: &str) -> Option<u64> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

async fn sleep(ms: u64) {
    hearth_guest::wstd::task::sleep(hearth_guest::wstd::time::Duration::from_millis(ms)).await;
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

#[expect(unconditional_recursion, reason = "the point is to overflow the stack")]
fn recurse_calling_host(n: u64) -> u64 {
    let mut frame = [n; 16];
    frame[1] = wasip2::clocks::monotonic_clock::now();
    std::hint::black_box(&mut frame);
    recurse_calling_host(n + frame[3]) + frame[1] % 2
}

#[expect(unconditional_recursion, reason = "the point is to overflow the stack")]
fn recurse(n: u64) -> u64 {
    let mut frame = [n; 64];
    std::hint::black_box(&mut frame);
    recurse(n + frame[3]) + 1
}
