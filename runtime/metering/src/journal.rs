//! The usage journal's files: each record is a frame (`frames.rs`) appended
//! to a file mapped into memory ([`Segment`]); on start, what a crash left
//! in them is ingested ([`recover_journal`]). The log (`log.rs`) decides
//! when they are synced, rewritten and rotated.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::frames::{Frames, decode, encode_all};
use crate::record::UsageRecord;
use crate::sink::{LogError, MAX_BATCH, Sink};

/// An open journal file, mapped into memory: an append is a copy into the
/// mapping, that is into the kernel's page cache, with no system call, and
/// is kept from then on whatever happens to the process (the pages belong
/// to the file, not to the process). The file's blocks are allocated ahead
/// (`fallocate`), so writing a page never needs space the disk lacks (which
/// a mapping could only report as a fatal `SIGBUS`); past the end, the file
/// is zeros, where recovery stops reading. It grows by doubling.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) file: std::fs::File,
    map: memmap2::MmapMut,
    pub(crate) len: usize,
    /// The start of the mapping whose pages are full and no longer mapped
    /// into the process ([`Segment::unmap_full_pages`]).
    unmapped: usize,
}

/// A new segment's first capacity.
const SEGMENT_START_BYTES: usize = 4 << 20;

impl Segment {
    /// Creates journal file `number` in `dir` holding `contents`.
    pub(crate) fn create(dir: &Path, number: u64, contents: &[u8]) -> std::io::Result<Segment> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(Journal::path(dir, number))?;
        let capacity = SEGMENT_START_BYTES.max((contents.len() + 1).next_power_of_two());
        let mut segment = Segment {
            map: Segment::map(&file, capacity)?,
            file,
            len: 0,
            unmapped: 0,
        };
        segment.append(contents)?;
        Ok(segment)
    }

    /// Allocates `capacity` bytes of `file` and maps them.
    fn map(file: &std::fs::File, capacity: usize) -> std::io::Result<memmap2::MmapMut> {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, capacity as u64) {
            Ok(()) => {}
            // A file system without preallocation (some network ones): the
            // tail stays sparse, and a full disk would stop the process.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                tracing::warn!("the usage journal's file system cannot preallocate; a full disk will stop Hearth");
                file.set_len(capacity as u64)?;
            }
            Err(err) => return Err(err.into()),
        }
        #[expect(
            unsafe_code,
            reason = "the mapped file is Hearth's own journal, which nothing else truncates while it is mapped"
        )]
        let map = unsafe { memmap2::MmapOptions::new().len(capacity).map_mut(file)? };
        Ok(map)
    }

    /// Appends `bytes`. Fault point `usage-journal-write`.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        fail::fail_point!("usage-journal-write", |_| Err(injected("usage-journal-write")));
        let end = self.len + bytes.len();
        if end > self.map.len() {
            self.map = Segment::map(&self.file, end.next_power_of_two())?;
            // The new mapping has touched none of the full pages.
            self.unmapped = self.full_pages_end();
        }
        self.map[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// The end of the full pages: the written length, down to a page.
    fn full_pages_end(&self) -> usize {
        self.len & !(rustix::param::page_size() - 1)
    }

    /// Takes the full pages (those no append writes again) out of the
    /// process's page tables; they stay in the page cache, dirty, as the
    /// file's contents. Called before each sync: writing back a page that
    /// is still mapped write-protects it, with a TLB shootdown of its own
    /// (an interrupt to every core running the process; a VM exit each on a
    /// virtual machine), whereas this is one shootdown for all of them.
    /// A failure only leaves them mapped.
    pub(crate) fn unmap_full_pages(&mut self) {
        let full = self.full_pages_end();
        if full <= self.unmapped {
            return;
        }
        #[expect(
            unsafe_code,
            reason = "the range is whole pages of a shared file mapping, which no append writes again and nothing reads \
                      through the mapping: the data stays in the file, and a later access would fault it back in"
        )]
        let advised = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.unmapped, full - self.unmapped)
        };
        match advised {
            Ok(()) => self.unmapped = full,
            Err(error) => tracing::debug!(%error, "cannot unmap the usage journal's full pages"),
        }
    }
}

/// Frames appended to the journal one after the other, with consecutive
/// sequences ending at `last_seq`: the queue of appends, then a sync group.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(crate) frames: Vec<u8>,
    pub(crate) records: usize,
    pub(crate) last_seq: u64,
}

impl Group {
    /// The first record's sequence.
    pub(crate) fn first_seq(&self) -> u64 {
        self.last_seq + 1 - self.records as u64
    }
}

/// The append side: the journal file and the records in it not yet ingested.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(crate) dir: PathBuf,
    /// `None` after a failed write, until the syncer has reopened it.
    pub(crate) file: Option<Segment>,
    pub(crate) number: u64,
    pub(crate) next_seq: u64,
    /// Written to the journal, not yet taken by the syncer.
    pub(crate) queue: Group,
    /// Taken by the syncer (synced, or being synced), group by group, not
    /// yet taken by an ingester (written again to a new journal if an fsync
    /// fails, carried into the next one when the journal rotates).
    pub(crate) in_flight: VecDeque<Group>,
    /// Frame buffers of ingested groups, emptied, for the next queues
    /// ([`Journal::recycle`]).
    pub(crate) spare: Vec<Vec<u8>>,
}

/// Most memory a journal keeps in emptied frame buffers for reuse: about
/// a tenth of a second of a busy node's records, what the idle ingester
/// takes at a time.
const SPARE_BYTES: usize = 4 << 20;

impl Journal {
    pub(crate) fn path(dir: &Path, number: u64) -> PathBuf {
        dir.join(format!("journal-{number:08}.log"))
    }

    /// Makes the queue a group of its own in `in_flight` and starts a new
    /// one; returns the group's last sequence (`None` if the queue was
    /// empty).
    pub(crate) fn take_queue(&mut self) -> Option<u64> {
        if self.queue.records == 0 {
            return None;
        }
        let frames = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.queue.frames.len()));
        let fresh = Group {
            frames,
            ..Group::default()
        };
        let group = std::mem::replace(&mut self.queue, fresh);
        let last = group.last_seq;
        self.in_flight.push_back(group);
        Some(last)
    }

    /// Keeps the frame buffer of an ingested group for a next queue: the
    /// queue then grows into memory already touched instead of allocating
    /// (and faulting in) a fresh buffer each sync interval, which another
    /// thread would free.
    pub(crate) fn recycle(&mut self, mut frames: Vec<u8>) {
        if self.spare.iter().map(Vec::capacity).sum::<usize>() + frames.capacity() <= SPARE_BYTES {
            frames.clear();
            self.spare.push(frames);
        }
    }

    /// Records synced or being synced, not yet ingested.
    pub(crate) fn in_flight_records(&self) -> usize {
        self.in_flight.iter().map(|group| group.records).sum()
    }

    /// The next journal file, starting with every record not yet ingested
    /// (`in_flight`, then `queue`), which it carries over from the current
    /// one. Appends go on to the current file until [`Journal::switch_to`].
    pub(crate) fn next_segment(&self) -> std::io::Result<Segment> {
        let groups: Vec<&[u8]> = self
            .in_flight
            .iter()
            .chain([&self.queue])
            .map(|g| &g.frames[..])
            .collect();
        Segment::create(&self.dir, self.number + 1, &groups.concat())
    }

    /// Sends appends to `segment`, made by [`Journal::next_segment`]; returns
    /// the path of the file it replaces.
    pub(crate) fn switch_to(&mut self, segment: Segment) -> PathBuf {
        let old = Journal::path(&self.dir, self.number);
        self.file = Some(segment);
        self.number += 1;
        old
    }

    /// The length of the open journal (0 when none is).
    pub(crate) fn len(&self) -> usize {
        self.file.as_ref().map_or(0, |segment| segment.len)
    }
}

/// Reads every journal in `dir` and ingests into `sink` the records it
/// lacks (those after its last sequence: ingestion is in sequence order, so
/// what a crash kept is a prefix), then drops the journals. Returns the last
/// sequence and the number of the journal to start.
pub(crate) fn recover_journal(sink: &mut impl Sink, dir: &Path) -> Result<(u64, u64), LogError> {
    let fail = |e: String| LogError::Database(format!("recovering the usage journal: {e}"));
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            // `.jsonl`: the JSON lines of an earlier Hearth.
            let name = path.file_name()?.to_str()?.strip_prefix("journal-")?;
            let number = name
                .strip_suffix(".log")
                .or_else(|| name.strip_suffix(".jsonl"))?
                .parse()
                .ok()?;
            Some((number, path))
        })
        .collect();
    files.sort();
    let last = sink.last_seq().map_err(fail)?;
    let mut missing: Vec<UsageRecord> = Vec::new();
    for (_, path) in &files {
        let bytes = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let mut rest = &bytes[..];
        // A mapped journal ends at its zeros; a record cut short or damaged
        // by a machine crash is the end of what was written: nothing after
        // it was acknowledged as durable.
        while let Some(Ok(record)) = decode(&mut rest) {
            if record.seq > last {
                missing.push(record);
            }
        }
    }
    missing.sort_by_key(|r| r.seq);
    missing.dedup_by_key(|r| r.seq);
    let recovered = missing.len();
    for batch in missing.chunks(MAX_BATCH) {
        let frames = encode_all(batch).map_err(|e| fail(e.to_string()))?;
        sink.write(Frames(&frames)).map_err(fail)?;
    }
    let last = missing.last().map_or(last, |r| r.seq);
    sink.checkpoint().map_err(fail)?;
    if recovered > 0 {
        tracing::info!(records = recovered, "usage records recovered from the journal");
    }
    for (_, path) in &files {
        std::fs::remove_file(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    }
    let number = files.last().map_or(0, |(number, _)| number + 1);
    Ok((last, number))
}

/// Makes the journal's writes durable. Fault point `usage-journal-sync`.
pub(crate) fn sync_journal(file: &std::fs::File) -> std::io::Result<()> {
    fail::fail_point!("usage-journal-sync", |_| Err(injected("usage-journal-sync")));
    file.sync_data()
}

#[cfg(feature = "failpoints")]
fn injected(point: &str) -> std::io::Error {
    std::io::Error::other(format!("injected fault ({point})"))
}

/// Arms the fault points named in `FAILPOINTS` (`name=actions;…`, as the
/// `fail` crate reads them: `usage-journal-sync=2*return->off`), once per
/// process. Only in builds with the `failpoints` feature (tests).
#[cfg(feature = "failpoints")]
pub(crate) fn arm_fault_points() {
    static ARMED: std::sync::Once = std::sync::Once::new();
    ARMED.call_once(|| {
        let Ok(points) = std::env::var("FAILPOINTS") else {
            return;
        };
        for point in points.split(';').filter(|p| !p.trim().is_empty()) {
            let (name, actions) = point.split_once('=').unwrap_or((point, "return"));
            if let Err(err) = fail::cfg(name.trim(), actions.trim()) {
                tracing::error!(point, error = %err, "bad fault point");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::encode;
    use crate::record::Outcome;

    /// Keeps what it is given.
    struct Kept(Vec<UsageRecord>);

    impl Sink for Kept {
        fn write(&mut self, frames: Frames<'_>) -> Result<(), String> {
            self.0.extend(frames.to_records()?);
            Ok(())
        }

        fn reopen(&mut self) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn ingested_frame_buffers_serve_the_next_queues_up_to_a_bound() {
        let mut journal = Journal {
            dir: PathBuf::new(),
            file: None,
            number: 0,
            next_seq: 2,
            queue: Group {
                frames: vec![1, 2, 3],
                records: 1,
                last_seq: 1,
            },
            in_flight: VecDeque::new(),
            spare: Vec::new(),
        };
        journal.recycle(vec![7; 1 << 20]);
        assert_eq!(journal.take_queue(), Some(1));
        assert!(journal.queue.frames.is_empty());
        assert!(
            journal.queue.frames.capacity() >= 1 << 20,
            "the spare buffer was reused"
        );
        for _ in 0..8 {
            journal.recycle(Vec::with_capacity(1 << 20));
        }
        assert_eq!(journal.spare.len(), SPARE_BYTES >> 20, "no more than the bound is kept");
    }

    #[test]
    fn a_mapped_journal_grows_and_is_recovered_up_to_its_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut segment = Segment::create(dir.path(), 3, &[]).expect("segment");
        let mut lines = 0u64;
        // Past the first capacity, so the mapping grows at least once.
        while segment.len <= SEGMENT_START_BYTES {
            lines += 1;
            let record = UsageRecord {
                seq: lines,
                ..crate::PriceTable::default().price(crate::tests::usage(&format!("id-{lines:08}"), Outcome::Ok))
            };
            let mut frame = Vec::new();
            encode(record.as_priced(), &mut frame).expect("encode");
            segment.append(&frame).expect("append");
            // As the syncer does before each sync: the pages' contents stay.
            if lines.is_multiple_of(97) {
                segment.unmap_full_pages();
            }
        }
        assert!(segment.map.len() > SEGMENT_START_BYTES);
        assert!(segment.unmapped > 0, "full pages were unmapped");
        // The process dies here: only the file remains.
        drop(segment);
        let mut kept = Kept(Vec::new());
        let (last, next) = recover_journal(&mut kept, dir.path()).expect("recover");
        assert_eq!((last, next), (lines, 4));
        let seqs: Vec<u64> = kept.0.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=lines).collect::<Vec<_>>(), "every line once, in order");
        assert!(
            std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
            "recovered journals are dropped"
        );
    }
}
