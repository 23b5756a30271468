//! The cache's key, a function's tenant and name, looked up by borrowed
//! names: a request's look-up builds no owned key.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// A tenant and a function name, owned (stored in the cache) or borrowed
/// (a look-up).
pub(crate) trait NamePair {
    /// The tenant and the name.
    fn names(&self) -> (&str, &str);
}

/// An owned key of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct FunctionName(pub String, pub String);

impl FunctionName {
    pub(crate) fn new(tenant: &str, name: &str) -> FunctionName {
        FunctionName(tenant.to_owned(), name.to_owned())
    }
}

impl NamePair for FunctionName {
    fn names(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl NamePair for (&str, &str) {
    fn names(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

// Hashes as `FunctionName`'s derived `Hash` does (each `String` hashes as its
// `str`), as `Borrow` requires.
impl Hash for dyn NamePair + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (tenant, name) = self.names();
        tenant.hash(state);
        name.hash(state);
    }
}

impl PartialEq for dyn NamePair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for dyn NamePair + '_ {}

impl<'a> Borrow<dyn NamePair + 'a> for FunctionName {
    fn borrow(&self) -> &(dyn NamePair + 'a) {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn borrowed_names_find_the_owned_key() {
        let mut map = HashMap::new();
        map.insert(FunctionName::new("acme", "ocr"), 1);
        map.insert(FunctionName::new("acme", "ocr2"), 2);
        map.insert(FunctionName::new("acmeo", "cr"), 3);
        assert_eq!(map.get(&("acme", "ocr") as &dyn NamePair), Some(&1));
        assert_eq!(map.get(&("acmeo", "cr") as &dyn NamePair), Some(&3));
        assert_eq!(map.get(&("acme", "oc") as &dyn NamePair), None);
    }
}
