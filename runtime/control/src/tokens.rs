//! `/v1/tokens`: create (the secret is in this answer only), list and revoke
//! bearer tokens. Admins manage their tenant's tokens; the operator's admin
//! token manages every tenant's and creates tenants.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use hearth_api::{CreateToken, TenantQuery, TokenInfo, TokenList};
use hearth_auth::Role;
use hearth_store::{TokenRecord, format_ms};

use hearth_http::{ApiError, AppState, authenticate};

/// A token as the API shows it: never the secret, except `token` right
/// after creation.
fn token_view(record: &TokenRecord, token: Option<String>) -> TokenInfo {
    TokenInfo {
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

fn bad(detail: String) -> ApiError {
    ApiError::BadRequest { detail, key: None }
}

/// `POST /v1/tokens`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<TokenInfo>), ApiError> {
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
        Json(token_view(&created.record, Some(created.token))),
    ))
}

/// `GET /v1/tokens`.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<TokenList>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let tenant = query.tenant.unwrap_or_else(|| caller.tenant.clone());
    let tokens = state.auth.list_tokens(&caller, &tenant).await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(|record| token_view(record, None)).collect(),
    }))
}

/// `DELETE /v1/tokens/{id}`: revokes a token by its id. A secret in the
/// path is refused (400): URLs end up in access logs.
pub(crate) async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<TokenInfo>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    if id.starts_with(hearth_auth::TOKEN_PREFIX) {
        return Err(ApiError::BadRequest {
            detail: "a token's value never goes in a URL: revoke it by id, or POST {\"token\": …} to \
                     /v1/tokens/revoke (and consider it leaked)"
                .into(),
            key: None,
        });
    }
    let revoked = state.auth.revoke(&caller, &id).await?;
    Ok(Json(token_view(&revoked, None)))
}

/// `POST /v1/tokens/revoke` with `{"token": "hth_…"}`: revokes a token by
/// its value.
pub(crate) async fn revoke_by_value(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<hearth_api::RevokeToken>,
) -> Result<Json<TokenInfo>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    if !body.token.starts_with(hearth_auth::TOKEN_PREFIX) {
        return Err(ApiError::BadRequest {
            detail: format!("`token`: expected a token (`{}…`)", hearth_auth::TOKEN_PREFIX),
            key: Some("token".into()),
        });
    }
    let revoked = state.auth.revoke(&caller, &body.token).await?;
    Ok(Json(token_view(&revoked, None)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_wire_and_the_minter_agree_on_what_a_token_looks_like() {
        assert_eq!(hearth_auth::TOKEN_PREFIX, hearth_api::TOKEN_VALUE_PREFIX);
    }
}
