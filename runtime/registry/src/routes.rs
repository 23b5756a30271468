//! Which version answers a request: `name@3` names a version, `name@prod`
//! an alias, and a bare `name` the alias `latest` (the newest version
//! unless a deployer pins it). An alias may split its requests over
//! versions by weight (per request at random, or by a hash of a sticky key
//! so one caller keeps one version) and mirror a share of them to a shadow
//! version.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dashmap::DashMap;
use hearth_store::{AliasTarget, LATEST};
use sha2::Digest as _;

use crate::Deployed;

/// What a request names after the function's `@`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector<'a> {
    /// One version, by number (`@3`).
    Version(u32),
    /// An alias (`@prod`; a bare name is `latest`).
    Alias(&'a str),
}

impl Selector<'_> {
    /// The bare name's selector.
    pub const LATEST: Selector<'static> = Selector::Alias(LATEST);
}

impl<'a> Selector<'a> {
    /// Splits a route's `name@selector` (a bare name selects `latest`).
    /// Names are checked by the caller; the selector here.
    pub fn split(target: &'a str) -> Result<(&'a str, Selector<'a>), String> {
        let Some((name, selector)) = target.split_once('@') else {
            return Ok((target, Selector::LATEST));
        };
        if selector.bytes().all(|b| b.is_ascii_digit()) {
            return match selector.parse::<u32>() {
                Ok(version) if version > 0 => Ok((name, Selector::Version(version))),
                _ => Err(format!("`@{selector}` is not a version number (1 or more)")),
            };
        }
        validate_alias(selector)?;
        Ok((name, Selector::Alias(selector)))
    }
}

/// Checks an alias name: a function name's rules, and not all digits
/// (those name versions).
pub fn validate_alias(alias: &str) -> Result<(), String> {
    if !alias.is_empty() && alias.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "alias `{alias}` is all digits, which names a version (`@{alias}`)"
        ));
    }
    hearth_manifest::validate_name(alias).map_err(|reason| format!("alias `{alias}`: {reason}"))
}

/// Checks what a deployer asks an alias to do: at least one route, positive
/// weights, no version twice, a shadow of 1 to 100 % on a version that does
/// not also answer.
pub fn validate_target(target: &AliasTarget) -> Result<(), String> {
    if target.routes.is_empty() {
        return Err("an alias needs at least one version".into());
    }
    let mut seen = std::collections::HashSet::new();
    for route in &target.routes {
        if route.weight == 0 {
            return Err(format!("version {} has weight 0; leave it out instead", route.version));
        }
        if !seen.insert(route.version) {
            return Err(format!("version {} is named twice", route.version));
        }
    }
    if target.routes.iter().map(|r| u64::from(r.weight)).sum::<u64>() > u64::from(u32::MAX) {
        return Err("the weights add up to more than 4294967295".into());
    }
    if let Some(shadow) = &target.shadow {
        if !(1..=100).contains(&shadow.percent) {
            return Err(format!("a shadow's percentage is 1 to 100, not {}", shadow.percent));
        }
        if seen.contains(&shadow.version) {
            return Err(format!(
                "version {} cannot shadow the alias it answers for",
                shadow.version
            ));
        }
    }
    Ok(())
}

/// A function's routing as this node caches it: the newest version, the
/// aliases set on it, and the versions loaded so far.
#[derive(Debug)]
pub(crate) struct Routes {
    /// The newest live version (what `latest` follows unless pinned).
    pub(crate) newest: u32,
    /// Aliases set by deployers, by name (shared by every request that
    /// comes through it, and by its usage record).
    pub(crate) aliases: HashMap<Arc<str>, AliasTarget>,
    /// `latest`'s name, for requests through an unpinned `latest`.
    pub(crate) latest: Arc<str>,
    /// Versions loaded so far.
    pub(crate) versions: DashMap<u32, Arc<Deployed>, foldhash::fast::RandomState>,
    /// Another node changed the function (or may have): read the store
    /// again before using this, and use it only while the store cannot
    /// be reached.
    pub(crate) stale: AtomicBool,
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The version that answers.
    pub(crate) version: u32,
    /// The alias it came through (`None`: called by version).
    pub(crate) alias: Option<Arc<str>>,
    /// A version that gets a copy of the request.
    pub(crate) shadow: Option<u32>,
}

impl Routes {
    /// Where a request for `selector` goes; `None` for an alias that is
    /// not set. `sticky` keeps one caller on one version of a split.
    pub(crate) fn choose(&self, selector: Selector<'_>, sticky: Option<&[u8]>) -> Option<Choice> {
        let alias = match selector {
            Selector::Version(version) => {
                return Some(Choice {
                    version,
                    alias: None,
                    shadow: None,
                });
            }
            Selector::Alias(alias) => alias,
        };
        let Some((name, target)) = self.aliases.get_key_value(alias) else {
            return (alias == LATEST).then(|| Choice {
                version: self.newest,
                alias: Some(self.latest.clone()),
                shadow: None,
            });
        };
        let version = pick(target, sticky);
        let shadow = target
            .shadow
            .filter(|shadow| rand::random_range(0..100) < shadow.percent)
            .map(|shadow| shadow.version);
        Some(Choice {
            version,
            alias: Some(name.clone()),
            shadow,
        })
    }
}

/// Picks a version of `target` by weight: at random, or by the hash of a
/// sticky key (the same key, the same version while the split stands).
fn pick(target: &AliasTarget, sticky: Option<&[u8]>) -> u32 {
    if let [only] = target.routes.as_slice() {
        return only.version;
    }
    let total: u64 = target.routes.iter().map(|route| u64::from(route.weight)).sum();
    let point = match sticky {
        Some(key) => {
            let hash = sha2::Sha256::digest(key);
            let mut first = [0u8; 8];
            first.copy_from_slice(&hash[..8]);
            u64::from_le_bytes(first) % total
        }
        None => rand::random_range(0..total),
    };
    let mut below = 0;
    for route in &target.routes {
        below += u64::from(route.weight);
        if point < below {
            return route.version;
        }
    }
    target.routes[target.routes.len() - 1].version
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_store::{Route, Shadow};

    fn split(a: u32, b: u32) -> AliasTarget {
        AliasTarget {
            routes: vec![Route { version: 1, weight: a }, Route { version: 2, weight: b }],
            shadow: None,
        }
    }

    #[test]
    fn selectors_name_versions_or_aliases() {
        assert_eq!(Selector::split("echo"), Ok(("echo", Selector::LATEST)));
        assert_eq!(Selector::split("echo@3"), Ok(("echo", Selector::Version(3))));
        assert_eq!(Selector::split("echo@prod"), Ok(("echo", Selector::Alias("prod"))));
        assert!(Selector::split("echo@0").is_err());
        assert!(Selector::split("echo@99999999999").is_err());
        assert!(Selector::split("echo@").is_err());
        assert!(Selector::split("echo@Prod!").is_err());
        assert!(validate_alias("42").is_err());
        assert!(validate_alias("canary-2").is_ok());
    }

    #[test]
    fn targets_are_checked() {
        assert!(validate_target(&split(90, 10)).is_ok());
        assert!(validate_target(&split(90, 0)).is_err());
        assert!(
            validate_target(&AliasTarget {
                routes: vec![],
                shadow: None
            })
            .is_err()
        );
        let mut twice = split(1, 1);
        twice.routes[1].version = 1;
        assert!(validate_target(&twice).is_err());
        let mut shadowed = split(1, 1);
        shadowed.shadow = Some(Shadow {
            version: 2,
            percent: 10,
        });
        assert!(validate_target(&shadowed).is_err(), "a shadow of an answering version");
        shadowed.shadow = Some(Shadow { version: 3, percent: 0 });
        assert!(validate_target(&shadowed).is_err());
    }

    #[test]
    fn weights_split_requests_and_sticky_keys_stay() {
        let target = split(90, 10);
        let smaller = (0..10_000).filter(|_| pick(&target, None) == 2).count();
        // 1,000 expected; 800..1,200 is over six standard deviations (30).
        assert!((800..1200).contains(&smaller), "{smaller} of 10,000 on the 10 % side");
        for key in ["alice", "bob", "carol"] {
            let first = pick(&target, Some(key.as_bytes()));
            assert!((0..100).all(|_| pick(&target, Some(key.as_bytes())) == first));
        }
        let sticky_smaller = (0..10_000)
            .filter(|i| pick(&target, Some(format!("user-{i}").as_bytes())) == 2)
            .count();
        assert!(
            (800..1200).contains(&sticky_smaller),
            "{sticky_smaller}: sticky keys follow the weights"
        );
        assert_eq!(pick(&split(1, 0), None), 1, "only positive weights are ever picked");
    }

    #[test]
    fn latest_follows_the_newest_unless_pinned() {
        let mut routes = Routes {
            newest: 4,
            aliases: HashMap::new(),
            latest: Arc::from(LATEST),
            versions: DashMap::default(),
            stale: AtomicBool::new(false),
        };
        let latest = Selector::LATEST;
        assert_eq!(routes.choose(latest, None).map(|c| c.version), Some(4));
        assert_eq!(routes.choose(Selector::Alias("prod"), None), None);
        assert_eq!(
            routes.choose(Selector::Version(2), None).map(|c| (c.version, c.alias)),
            Some((2, None))
        );
        routes.aliases.insert(Arc::from(LATEST), AliasTarget::single(3));
        assert_eq!(routes.choose(latest, None).map(|c| c.version), Some(3));
        let mut mirrored = AliasTarget::single(3);
        mirrored.shadow = Some(Shadow {
            version: 4,
            percent: 100,
        });
        routes.aliases.insert(Arc::from("prod"), mirrored);
        let choice = routes.choose(Selector::Alias("prod"), None).expect("set");
        assert_eq!((choice.version, choice.shadow), (3, Some(4)));
    }
}
