//! `GET /v1/usage` (records, streamed as CSV, JSON lines or CloudEvents) and
//! `GET /v1/usage/summary` (totals per tenant, function and day), for tokens
//! with the `billing` (or `admin`) role, always within one tenant.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_api::{NEXT_CURSOR_HEADER, TenantQuery, UsageQuery, UsageSummary, UsageSummaryPage};
use hearth_auth::Action;
use hearth_metering::{Encoder, Filter, Format, UsageQueries, UsageRecord};
use http::{HeaderMap, HeaderValue, header};

use hearth_http::{ApiError, AppState, scope};

/// Records per page read from the log while streaming an export.
const PAGE: usize = 1000;

/// A failed query: 503 when it is worth retrying (the ledger is away).
fn failed(err: hearth_metering::LogError) -> ApiError {
    match err {
        hearth_metering::LogError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
        err => ApiError::Internal(err.to_string()),
    }
}

fn bad(detail: String) -> ApiError {
    ApiError::BadRequest { detail, key: None }
}

/// Parses `since`/`until`: RFC 3339, or a date meaning its UTC midnight.
fn parse_time(name: &str, value: &str) -> Result<i64, ApiError> {
    use time::format_description::well_known::Rfc3339;
    let parsed = time::OffsetDateTime::parse(value, &Rfc3339).or_else(|_| {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(value, &format).map(|d| d.midnight().assume_utc())
    });
    let at = parsed.map_err(|_| {
        bad(format!(
            "`{name}={value}`: expected RFC 3339 (2026-11-29T10:00:00Z) or a date (2026-11-29)"
        ))
    })?;
    i64::try_from(at.unix_timestamp_nanos() / 1000).map_err(|_| bad(format!("`{name}` is out of range")))
}

async fn filter(
    state: &AppState,
    headers: &HeaderMap,
    query: &UsageQuery,
) -> Result<(Filter, Arc<dyn UsageQueries>), ApiError> {
    let tenant = TenantQuery {
        tenant: query.tenant.clone(),
    };
    let (tenant, _) = scope(state, headers, &tenant, Action::ReadUsage).await?;
    let log = state
        .usage
        .clone()
        .ok_or_else(|| ApiError::NotFound("metering is off on this server (--no-metering)".into()))?;
    let filter = Filter {
        tenant: Some(tenant),
        function: query.function.clone(),
        since_us: query.since.as_deref().map(|v| parse_time("since", v)).transpose()?,
        until_us: query.until.as_deref().map(|v| parse_time("until", v)).transpose()?,
    };
    Ok((filter, log))
}

/// `GET /v1/usage`: the records, oldest first, streamed in the asked format.
pub(crate) async fn export(
    State(state): State<Arc<AppState>>,
    Query(query): Query<UsageQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = match query.format.as_deref() {
        None => Format::Jsonl,
        Some(name) => {
            Format::parse(name).ok_or_else(|| bad(format!("`format={name}`: expected csv, jsonl or cloudevents")))?
        }
    };
    let (filter, log) = filter(&state, &headers, &query).await?;
    let source = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| "hearth".to_owned(), |host| format!("http://{host}"));
    let encoder = Arc::new(Encoder::new(format, source));
    let after = match query.cursor.as_deref() {
        None => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            bad(format!(
                "`cursor={text}`: expected a commit sequence number, as sent in `{NEXT_CURSOR_HEADER}`"
            ))
        })?,
    };
    // Everything recorded so far (in a cluster: everything this node
    // recorded, and what other nodes have shipped) is queryable from here;
    // this answer goes up to it, and the next one starts after it.
    let upto = log.catch_up().await.map_err(failed)?.max(after);
    let (mut response, next) = if let Some(limit) = query.limit {
        let limit = limit.clamp(1, 10 * PAGE);
        let records = log.page(&filter, after, upto, limit).await.map_err(failed)?;
        let mut bytes = encoder.header();
        for record in &records {
            bytes.extend(encoder.record(record));
        }
        // A full page continues after its last record; a shorter one
        // reached the newest, and the consumer polls from there.
        let next = match records.last() {
            Some(last) if records.len() == limit => last.seq,
            _ => upto,
        };
        (Response::new(Body::from(bytes)), next)
    } else {
        let stream = stream_all(log, filter, encoder, after, upto);
        (Response::new(Body::from_stream(stream)), upto)
    };
    let headers = response.headers_mut();
    headers.insert(NEXT_CURSOR_HEADER, HeaderValue::from(next));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    Ok(response)
}

/// Every matching record after `after` up to `upto`, a page at a time, as
/// encoded chunks.
fn stream_all(
    log: Arc<dyn UsageQueries>,
    filter: Filter,
    encoder: Arc<Encoder>,
    after: u64,
    upto: u64,
) -> impl futures::Stream<Item = Result<Bytes, hearth_metering::LogError>> + Send {
    struct Position {
        after: u64,
        started: bool,
        done: bool,
    }
    let start = Position {
        after,
        started: false,
        done: false,
    };
    futures::stream::try_unfold(start, move |mut at| {
        let (log, filter, encoder) = (log.clone(), filter.clone(), encoder.clone());
        async move {
            if at.done {
                return Ok(None);
            }
            let records: Vec<UsageRecord> = log.page(&filter, at.after, upto, PAGE).await?;
            let mut chunk = if at.started { Vec::new() } else { encoder.header() };
            at.started = true;
            at.done = records.len() < PAGE;
            at.after = records.last().map_or(at.after, |r| r.seq);
            for record in &records {
                chunk.extend(encoder.record(record));
            }
            Ok(Some((Bytes::from(chunk), at)))
        }
    })
}

/// `GET /v1/usage/summary`: totals per tenant, function and UTC day.
pub(crate) async fn summary(
    State(state): State<Arc<AppState>>,
    Query(query): Query<UsageQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (filter, log) = filter(&state, &headers, &query).await?;
    let rows = log.summary(&filter).await.map_err(failed)?;
    let rows = rows
        .into_iter()
        .map(|row| UsageSummary {
            tenant: row.tenant,
            function: row.function,
            version: row.version,
            shadow: row.shadow,
            errors: row.errors,
            mean_wall_ms: row.mean_wall_ms,
            day: row.day,
            invocations: row.invocations,
            ran: row.ran,
            rejected: row.rejected,
            cold_starts: row.cold_starts,
            billed_ms: row.billed_ms,
            guest_cpu_us: row.guest_cpu_us,
            compute_ms: row.compute_ms,
            gpu_ms: row.gpu_ms,
            inference_calls: row.inference_calls,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            cost: row.cost,
            currency: row.currency,
        })
        .collect();
    Ok(Json(UsageSummaryPage { rows }).into_response())
}
