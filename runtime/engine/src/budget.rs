//! The server's memory budget: what its instances may take together with
//! the models loaded on the CPU. Every instance reserves its function's
//! whole memory limit when its store is made (whether or not it grows that
//! far) and gives it back when the instance is dropped; an instance that
//! would take the total past the budget is not made, and its request is
//! refused (503) instead of the kernel killing the server later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes reserved by live instances, against a budget.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: u64,
    reserved: AtomicU64,
}

/// One instance's share of the budget, given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl MemoryBudget {
    pub(crate) fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            reserved: AtomicU64::new(0),
        })
    }

    /// Reserves `bytes` for an instance while `models` bytes of models are
    /// loaded, if that fits.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: u64, models: u64) -> Option<Reservation> {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                let total = reserved.checked_add(bytes)?.checked_add(models)?;
                (total <= self.limit).then_some(reserved + bytes)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The memory this process may use: the machine's (`/proc/meminfo`), or
/// its cgroup's limit when that is lower (a container's memory limit, which
/// `/proc/meminfo` does not show); `None` where neither is readable.
pub fn machine_memory_bytes() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| cgroup_limit(&std::fs::read_to_string(path).ok()?));
    match (machine, cgroup) {
        (Some(machine), Some(cgroup)) => Some(machine.min(cgroup)),
        (machine, cgroup) => machine.or(cgroup),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A cgroup memory limit file's value in bytes; `None` for no limit
/// (`max` in v2, a page-rounded `i64::MAX` in v1).
fn cgroup_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_containers_limit_is_read_from_its_cgroup() {
        assert_eq!(
            mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(cgroup_limit("2147483648\n"), Some(2 << 30));
        assert_eq!(cgroup_limit("max\n"), None, "cgroup v2 without a limit");
        assert_eq!(cgroup_limit("9223372036854771712\n"), None, "cgroup v1 without a limit");
    }

    #[test]
    fn reservations_fit_the_budget_with_the_models_and_come_back() {
        let budget = MemoryBudget::new(100);
        let first = budget.reserve(60, 10).expect("fits");
        assert!(budget.reserve(40, 10).is_none(), "60 + 40 + 10 models > 100");
        assert!(
            budget.reserve(30, 10).is_some_and(|r| r.bytes == 30),
            "fits, dropped at once"
        );
        drop(first);
        assert_eq!(budget.reserved.load(Ordering::Acquire), 0);
        assert!(budget.reserve(90, 10).is_some());
    }
}
