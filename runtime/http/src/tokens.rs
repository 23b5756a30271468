//! `/v1/tokens`: create (the secret is in this answer only), list and revoke
//! bearer tokens. Admins manage their tenant's tokens; the operator's admin
//! token manages every tenant's and creates tenants.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use hearth_auth::Role;
use hearth_store::{TokenRecord, format_ms};
use serde::{Deserialize, Serialize};

use crate::control::TenantQuery;
use crate::{ApiError, AppState, authenticate};

/// `POST /v1/tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    /// Tenant (the caller's own by default).
    tenant: Option<String>,
    /// `admin`, `deployer`, `invoker` or `billing`.
    role: String,
    /// Lifetime like `30d`, `12h`, `90m` (forever when absent).
    expires: Option<String>,
}

/// A token as the API shows it: never the secret, except `token` right after
/// creation.
#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    id: String,
    tenant: String,
    role: String,
    operator: bool,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl TokenView {
    fn new(record: &TokenRecord, token: Option<String>) -> TokenView {
        TokenView {
            id: record.id.clone(),
            tenant: record.tenant.clone(),
            role: record.role.clone(),
            operator: record.operator,
            created_at: format_ms(record.created_at_ms),
            expires_at: record.expires_at_ms.map(format_ms),
            revoked_at: record.revoked_at_ms.map(format_ms),
            token,
        }
    }
}

fn bad(detail: String) -> ApiError {
    ApiError::BadRequest { detail, key: None }
}

/// `POST /v1/tokens`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let Json(body) = body.map_err(|e| bad(format!("token request: {}", e.body_text())))?;
    let tenant = body.tenant.unwrap_or_else(|| caller.tenant.clone());
    hearth_manifest::validate_name(&tenant).map_err(|reason| bad(format!("tenant: {reason}")))?;
    let role = Role::parse(&body.role).ok_or_else(|| {
        bad(format!(
            "role `{}`: expected admin, deployer, invoker or billing",
            body.role
        ))
    })?;
    let ttl = body
        .expires
        .as_deref()
        .map(|text| {
            humantime::parse_duration(text)
                .map_err(|e| bad(format!("expires `{text}`: {e} (examples: 30d, 12h, 90m)")))
                .and_then(|ttl| {
                    if ttl.is_zero() {
                        Err(bad("expires must be positive".into()))
                    } else {
                        Ok(ttl)
                    }
                })
        })
        .transpose()?;
    let created = state.auth.create_token(&caller, &tenant, role, ttl).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenView::new(&created.record, Some(created.token))),
    ))
}

/// `GET /v1/tokens`.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let tenant = query.tenant.unwrap_or_else(|| caller.tenant.clone());
    let tokens: Vec<TokenView> = state
        .auth
        .list_tokens(&caller, &tenant)
        .await?
        .iter()
        .map(|record| TokenView::new(record, None))
        .collect();
    Ok(Json(serde_json::json!({ "tokens": tokens })))
}

/// `DELETE /v1/tokens/{id_or_token}`.
pub(crate) async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(id_or_token): Path<String>,
    headers: HeaderMap,
) -> Result<Json<TokenView>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let revoked = state.auth.revoke(&caller, &id_or_token).await?;
    Ok(Json(TokenView::new(&revoked, None)))
}
