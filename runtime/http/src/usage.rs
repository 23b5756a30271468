//! `GET /v1/usage` (records, streamed as CSV, JSON lines or CloudEvents) and
//! `GET /v1/usage/summary` (totals per tenant, function and day), for tokens
//! with the `billing` (or `admin`) role, always within one tenant.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hearth_auth::Action;
use hearth_metering::{Encoder, Filter, Format, UsageLog, UsageRecord};
use http::{HeaderMap, HeaderValue, header};

use crate::control::{TenantQuery, scoped_principal};
use crate::{ApiError, AppState};

/// Records per page read from the log while streaming an export.
const PAGE: usize = 1000;
/// Header with the cursor of the next page, when `limit` cut the answer.
pub const NEXT_CURSOR_HEADER: &str = "x-hearth-next-cursor";

#[derive(Debug, serde::Deserialize)]
pub(crate) struct UsageQuery {
    tenant: Option<String>,
    function: Option<String>,
    /// RFC 3339 time or `YYYY-MM-DD` (UTC midnight), inclusive.
    since: Option<String>,
    /// Same forms, exclusive.
    until: Option<String>,
    /// `csv`, `jsonl` (default) or `cloudevents`.
    format: Option<String>,
    /// Answer at most this many records (then `x-hearth-next-cursor`).
    limit: Option<usize>,
    /// Continue after this record id (from `x-hearth-next-cursor`).
    cursor: Option<String>,
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

async fn filter(state: &AppState, headers: &HeaderMap, query: &UsageQuery) -> Result<(Filter, UsageLog), ApiError> {
    let scope = TenantQuery {
        tenant: query.tenant.clone(),
    };
    let (tenant, _) = scoped_principal(state, headers, &scope, Action::ReadUsage).await?;
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
    let mut response = if let Some(limit) = query.limit {
        // One page, and where the next starts.
        let records = log
            .page(&filter, query.cursor.as_deref(), limit.clamp(1, 10 * PAGE))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut bytes = encoder.header();
        for record in &records {
            bytes.extend(encoder.record(record));
        }
        let mut response = Response::new(Body::from(bytes));
        if records.len() == limit.clamp(1, 10 * PAGE)
            && let Some(last) = records.last()
            && let Ok(value) = HeaderValue::from_str(&last.usage.id)
        {
            response.headers_mut().insert(NEXT_CURSOR_HEADER, value);
        }
        response
    } else {
        Response::new(Body::from_stream(stream_all(log, filter, encoder, query.cursor)))
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    Ok(response)
}

/// Every matching record, a page at a time, as encoded chunks.
fn stream_all(
    log: UsageLog,
    filter: Filter,
    encoder: Arc<Encoder>,
    cursor: Option<String>,
) -> impl futures::Stream<Item = Result<Bytes, hearth_metering::LogError>> + Send {
    struct Position {
        cursor: Option<String>,
        started: bool,
        done: bool,
    }
    let start = Position {
        cursor,
        started: false,
        done: false,
    };
    futures::stream::try_unfold(start, move |mut at| {
        let (log, filter, encoder) = (log.clone(), filter.clone(), encoder.clone());
        async move {
            if at.done {
                return Ok(None);
            }
            let records: Vec<UsageRecord> = log.page(&filter, at.cursor.as_deref(), PAGE).await?;
            let mut chunk = if at.started { Vec::new() } else { encoder.header() };
            at.started = true;
            at.done = records.len() < PAGE;
            at.cursor = records.last().map(|r| r.usage.id.clone()).or(at.cursor);
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
    let rows = log
        .summary(&filter)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(serde_json::json!({ "rows": rows })).into_response())
}
