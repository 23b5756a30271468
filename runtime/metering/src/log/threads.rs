//! The usage log's threads: the syncer, which makes the journal durable,
//! and the two ingesters, which move synced records into the database; and
//! how each recovers from a failed write. `log.rs` holds what they share
//! and the side the invocations and queries call.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{BACKLOG, Durability, INGEST_NICE, JOURNAL_ROTATE_BYTES, Shared};
use crate::frames::Frames;
use crate::journal::{Group, sync_journal};
use crate::record::now_us;
use crate::sink::{MAX_BATCH, Sink};

/// The syncer thread: waits for records and makes them durable, one fsync
/// of the journal per group; until the log is closed and everything in it
/// is synced. The ingesters take them from there.
pub(super) fn syncer(shared: &Shared) {
    loop {
        let closing = shared.closed.load(Ordering::Acquire);
        wait_for_group(shared, closing);
        let (group, file, backlog) = {
            let mut journal = shared.journal();
            let group = journal.take_queue();
            if let Some(segment) = journal.file.as_mut() {
                segment.unmap_full_pages();
            }
            let file = journal.file.as_ref().and_then(|f| f.file.try_clone().ok());
            (group, file, journal.in_flight_records())
        };
        let broken = file.is_none() || !shared.journal_ok.load(Ordering::Acquire);
        if group.is_some() || broken {
            let synced = match &file {
                Some(file) => sync_journal(file).map_err(|e| e.to_string()),
                None => Err("the journal is not open".to_owned()),
            };
            let top = match synced {
                Ok(()) => group,
                Err(error) => {
                    shared.journal_ok.store(false, Ordering::Release);
                    shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error,
                        "usage journal fsync failed; refusing invocations until it recovers"
                    );
                    rewrite_journal(shared)
                }
            };
            if let Some(top) = top {
                shared.stats.synced.fetch_max(top, Ordering::AcqRel);
                shared
                    .stats
                    .last_sync_us
                    .store(u64::try_from(now_us()).unwrap_or(0), Ordering::Release);
                shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
                shared.synced.send_modify(|synced| *synced = (*synced).max(top));
            }
            shared.journal_ok.store(true, Ordering::Release);
            if top.is_some() && (backlog >= BACKLOG || shared.reader_waits()) {
                shared.wake_ingest_now();
            }
        }
        if closing {
            shared.all_synced.store(true, Ordering::Release);
            shared.wake_ingester();
            shared.wake_ingest_now();
            return;
        }
    }
}

/// The idle-time ingester, at [`INGEST_NICE`]: every
/// [`Pace::ingest_every`](super::Pace::ingest_every), moves the synced
/// records into the database, one transaction of up to [`MAX_BATCH`] at a
/// time (taking the database in turns with [`ingest_now`]), and starts a
/// fresh journal when the current one is large; stops once the log is
/// closed.
pub(super) fn ingest_idle<S: Sink>(sink: &Mutex<S>, shared: &Shared) {
    lower_priority();
    loop {
        let deadline = Instant::now() + shared.pace.ingest_every;
        loop {
            let now = Instant::now();
            if shared.all_synced.load(Ordering::Acquire) {
                return;
            }
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
        loop {
            let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
            if ingest(&mut *sink, shared, MAX_BATCH) < MAX_BATCH {
                rotate_if_large(&mut *sink, shared);
                break;
            }
        }
    }
}

/// The normal-priority ingester: sleeps until a reader waits for synced
/// records or more than [`BACKLOG`] wait, then ingests everything synced;
/// once the log is closed and everything synced, ingests the rest, makes
/// the database durable and stops.
pub(super) fn ingest_now<S: Sink>(sink: &Mutex<S>, shared: &Shared) {
    let backlog = || shared.journal().in_flight_records() >= BACKLOG;
    loop {
        let last = loop {
            // Read before the sequence it covers (the syncer stores them in
            // the other order): once it is set, everything is synced.
            let last = shared.all_synced.load(Ordering::Acquire);
            if last || shared.reader_waits() || backlog() {
                break last;
            }
            std::thread::park();
        };
        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        ingest(&mut *sink, shared, usize::MAX);
        if last {
            let _ = sink.checkpoint();
            return;
        }
        rotate_if_large(&mut *sink, shared);
    }
}

/// Ingests synced groups, in commit order (the caller holds the database,
/// so no other ingestion interleaves), until at least `limit` records or
/// all of them, in transactions of at most [`MAX_BATCH`], and makes them
/// visible; returns how many.
fn ingest(sink: &mut impl Sink, shared: &Shared, limit: usize) -> usize {
    let synced = shared.stats.synced.load(Ordering::Acquire);
    let mut groups: Vec<Group> = Vec::new();
    let mut taken = 0;
    {
        let mut journal = shared.journal();
        while taken < limit
            && let Some(group) = journal.in_flight.pop_front_if(|g| g.last_seq <= synced)
        {
            taken += group.records;
            groups.push(group);
        }
    }
    for group in &groups {
        let mut top = group.first_seq() - 1;
        for (run, records) in Frames(&group.frames).runs(MAX_BATCH) {
            if let Err(error) = sink.write(run) {
                shared.database_ok.store(false, Ordering::Release);
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error,
                    records,
                    "usage log write failed; refusing invocations until it recovers"
                );
                recover(sink, run, shared);
                shared.database_ok.store(true, Ordering::Release);
                tracing::info!("usage log recovered");
            }
            top += records as u64;
            shared.stats.commits.fetch_add(1, Ordering::Relaxed);
            shared.stats.records.fetch_add(records as u64, Ordering::Relaxed);
            shared.visible.send_modify(|visible| *visible = (*visible).max(top));
        }
    }
    if !groups.is_empty() {
        let mut journal = shared.journal();
        for group in groups {
            journal.recycle(group.frames);
        }
    }
    taken
}

/// Lowers the calling thread's scheduling priority to [`INGEST_NICE`]
/// (Linux nice values are per thread). Failing is harmless: the thread
/// then competes with the invocations as an equal.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), INGEST_NICE) {
        tracing::debug!(error = %error, "cannot lower the usage ingester's priority");
    }
}

/// Sleeps until there is a group to sync: in strict mode at once (holding
/// the group open while announced invocations are still to append, at most
/// [`Pace::window`](super::Pace::window)); in process mode at the end of
/// the sync interval, unless someone waits for durability or the log is
/// closing.
fn wait_for_group(shared: &Shared, closing: bool) {
    let queued = || shared.journal().queue.records > 0;
    let someone_waits = || {
        shared.wanted.load(Ordering::Acquire) > *shared.synced.borrow() || !shared.journal_ok.load(Ordering::Acquire)
    };
    if closing {
        return;
    }
    // Nothing to do: sleep until an append, a waiter or a close wakes us.
    while !queued() && !someone_waits() && !shared.closed.load(Ordering::Acquire) {
        std::thread::park();
    }
    let (window, strict) = match shared.config.durability {
        Durability::Strict => (shared.pace.window, true),
        Durability::Process => (shared.config.sync_interval, false),
    };
    let deadline = Instant::now() + window;
    loop {
        let now = Instant::now();
        // A strict waiter waits for its group: the window is what groups.
        if now >= deadline || (!strict && someone_waits()) || shared.closed.load(Ordering::Acquire) {
            return;
        }
        if strict && shared.pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        if strict {
            shared.syncer_waiting.store(true, Ordering::SeqCst);
            if shared.pending.load(Ordering::SeqCst) > 0 {
                std::thread::park_timeout(deadline - now);
            }
            shared.syncer_waiting.store(false, Ordering::SeqCst);
        } else {
            std::thread::park_timeout(deadline - now);
        }
    }
}

/// After a failed fsync (or write): the page cache's state is unknown, so
/// a new journal file takes every record not yet ingested, written again in
/// full, and is synced; retried with backoff until it works. Returns the
/// highest sequence it made durable.
fn rewrite_journal(shared: &Shared) -> Option<u64> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = {
            let mut journal = shared.journal();
            let written = journal
                .next_segment()
                .and_then(|segment| sync_journal(&segment.file).map(|()| segment));
            written.map(|segment| {
                journal.take_queue();
                // The old file's state is unknown: it is left for the next
                // start, whose recovery reads what it can of it.
                journal.switch_to(segment);
                journal.in_flight.back().map(|group| group.last_seq)
            })
        };
        match attempt {
            Ok(top) => {
                tracing::info!("usage journal reopened; records not yet ingested written again and synced");
                return top;
            }
            Err(error) => {
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %error, "usage journal still failing");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Starts a fresh journal once the current one is large (on the ingester,
/// after an ingestion): the database is synced on its own first, so every
/// record ingested is kept there; the new journal starts with every record
/// not yet ingested and is synced before the old one is dropped.
fn rotate_if_large(sink: &mut impl Sink, shared: &Shared) {
    if (shared.journal().len() as u64) < JOURNAL_ROTATE_BYTES {
        return;
    }
    // Outside the lock, so appends go on meanwhile; only this thread
    // ingests, so nothing is ingested between this and the switch.
    if let Err(error) = sink.checkpoint() {
        tracing::warn!(error, "usage database checkpoint failed; keeping the journal");
        return;
    }
    let switched = {
        let mut journal = shared.journal();
        journal.next_segment().and_then(|segment| {
            let file = segment.file.try_clone()?;
            Ok((journal.switch_to(segment), file))
        })
    };
    // The records carried over may be unsynced in the old file (the syncer
    // may be syncing them there now): they are made durable in the new one
    // before the old goes. If that fails, the old file stays for the next
    // start, and the syncer, failing on the new file too, writes them again.
    let outcome = switched.and_then(|(old, file)| sync_journal(&file).map(|()| old));
    match outcome {
        Ok(old) => {
            if let Err(error) = std::fs::remove_file(&old) {
                tracing::warn!(error = %error, path = %old.display(), "cannot remove an ingested usage journal");
            }
        }
        Err(error) => tracing::warn!(error = %error, "cannot start a new usage journal; keeping the old one"),
    }
}

/// Reopens and checks the store, then writes `frames` again (what of them
/// was stored is skipped), retrying with backoff until it succeeds.
fn recover(sink: &mut impl Sink, frames: Frames<'_>, shared: &Shared) {
    let mut backoff = Duration::from_millis(50);
    loop {
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let attempt = sink.reopen().and_then(|()| {
            tracing::info!(
                records = frames.len(),
                "usage log reopened; writing the failed group again"
            );
            sink.write(frames)
        });
        match attempt {
            Ok(()) => return,
            Err(error) => {
                shared.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error, "usage log still failing");
            }
        }
    }
}
