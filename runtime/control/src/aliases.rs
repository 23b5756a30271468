//! Versions and aliases under `/v1/functions/{name}`: list and delete
//! versions, set, unset and roll back aliases, and read an alias's history.
//! Reading needs `ReadFunctions`; every change needs `Deploy`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use hearth_api::{AliasHistory, AliasInfo, AliasList, AliasRoute, AliasShadow, SetAlias, TenantQuery, VersionList};
use hearth_auth::Action;
use hearth_store::{AliasChange, AliasTarget, LATEST, Route, Shadow, format_ms};

use crate::functions::{check_name, version_view};
use hearth_http::{ApiError, AppState, scope};

/// `GET /v1/functions/{name}/versions`.
pub(crate) async fn versions(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<VersionList>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    check_name(&name)?;
    let versions = state.invoker.registry().versions(&tenant, &name).await?;
    Ok(Json(VersionList {
        versions: versions.iter().map(version_view).collect(),
    }))
}

/// `DELETE /v1/functions/{name}/versions/{version}`: 409 while an alias
/// points at it, or if it is the last one.
pub(crate) async fn delete_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, u32)>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    state.invoker.registry().delete_version(&tenant, &name, version).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/functions/{name}/aliases`: `latest` first (following the
/// newest version unless pinned), then the others by name.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<AliasList>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    check_name(&name)?;
    let registry = state.invoker.registry();
    let set = registry.aliases(&tenant, &name).await?;
    let mut aliases = Vec::with_capacity(set.len() + 1);
    if !set.iter().any(|alias| alias.name == LATEST) {
        let newest = registry.versions(&tenant, &name).await?;
        let history = registry.alias_history(&tenant, &name, LATEST).await?;
        aliases.push(AliasInfo {
            alias: LATEST.to_owned(),
            routes: newest
                .last()
                .map(|v| {
                    vec![AliasRoute {
                        version: v.version,
                        weight: 1,
                    }]
                })
                .unwrap_or_default(),
            shadow: None,
            follows_newest: true,
            set_at: history.last().map(|c| format_ms(c.at_ms)).unwrap_or_default(),
        });
    }
    let mut others = Vec::new();
    for alias in set {
        let change = AliasChange {
            at_ms: alias.set_at_ms,
            target: Some(alias.target),
            follows_newest: false,
        };
        let info = info(&alias.name, &change);
        if alias.name == LATEST {
            aliases.push(info);
        } else {
            others.push(info);
        }
    }
    aliases.extend(others);
    Ok(Json(AliasList { aliases }))
}

/// `PUT /v1/functions/{name}/aliases/{alias}`: points the alias at the
/// versions in the body.
pub(crate) async fn set(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
    Json(body): Json<SetAlias>,
) -> Result<Json<AliasInfo>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    let target = AliasTarget {
        routes: body
            .routes
            .iter()
            .map(|r| Route {
                version: r.version,
                weight: r.weight,
            })
            .collect(),
        shadow: body.shadow.map(|s| Shadow {
            version: s.version,
            percent: s.percent,
        }),
    };
    let change = state
        .invoker
        .registry()
        .set_alias(&tenant, &name, &alias, Some(target))
        .await?;
    Ok(Json(info(&alias, &change)))
}

/// `DELETE /v1/functions/{name}/aliases/{alias}`: unsets it (`latest`
/// follows the newest version again).
pub(crate) async fn unset(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    state.invoker.registry().set_alias(&tenant, &name, &alias, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/functions/{name}/aliases/{alias}/history`.
pub(crate) async fn history(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<AliasHistory>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::ReadFunctions).await?;
    check_name(&name)?;
    let changes = state.invoker.registry().alias_history(&tenant, &name, &alias).await?;
    Ok(Json(AliasHistory {
        changes: changes.iter().map(|change| info(&alias, change)).collect(),
    }))
}

/// `POST /v1/functions/{name}/aliases/{alias}/rollback`: points the alias
/// back at its previous target (409 when it has none).
pub(crate) async fn rollback(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    Query(query): Query<TenantQuery>,
    headers: HeaderMap,
) -> Result<Json<AliasInfo>, ApiError> {
    let (tenant, _) = scope(&state, &headers, &query, Action::Deploy).await?;
    check_name(&name)?;
    let change = state.invoker.registry().rollback(&tenant, &name, &alias).await?;
    Ok(Json(info(&alias, &change)))
}

fn info(alias: &str, change: &AliasChange) -> AliasInfo {
    let target = change.target.as_ref();
    AliasInfo {
        alias: alias.to_owned(),
        routes: target
            .map(|t| {
                t.routes
                    .iter()
                    .map(|r| AliasRoute {
                        version: r.version,
                        weight: r.weight,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        shadow: target.and_then(|t| t.shadow).map(|s| AliasShadow {
            version: s.version,
            percent: s.percent,
        }),
        follows_newest: change.follows_newest,
        set_at: format_ms(change.at_ms),
    }
}
