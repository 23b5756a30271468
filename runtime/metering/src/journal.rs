//! The usage journal's files: each record is a frame ([`encode`]) appended
//! to a file mapped into memory ([`Segment`]); on start, what a crash left
//! in them is ingested ([`recover_journal`]). The log (`log.rs`) decides
//! when they are synced, rewritten and rotated.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::record::UsageRecord;
use crate::sink::{LogError, MAX_BATCH, Sink};

/// The first byte of a frame, which names the layout of its payload:
/// neither a JSON line's `{` (the journals of earlier Hearths, still read)
/// nor the zeros of a journal's unwritten tail. Postcard encodes a struct
/// as its fields in order, with no names and no defaults, so a frame can
/// only be read with the field list it was written with: a change to the
/// fields of [`UsageRecord`] (or of `Usage`, or to the order of `Outcome`)
/// takes a new tag, and [`decode`] keeps reading this one (as a copy of
/// today's structs) for the journals and the pages of `usage.db` written
/// before. `frames_keep_their_layout` fails until that is done.
const FRAME_TAG: u8 = 0xB7;
/// A frame's tag, payload length and payload CRC-32 (little-endian).
const FRAME_HEADER: usize = 9;

/// Appends `record`'s frame to `out`: a header ([`FRAME_TAG`], the
/// payload's length and CRC-32), then the record in postcard's encoding
/// (compact and by field order, a fraction of JSON's size and cost to
/// write: this is on every answer's path). The CRC tells a frame a machine
/// crash tore from a whole one.
pub(crate) fn encode(record: &UsageRecord, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let start = out.len();
    out.extend_from_slice(&[FRAME_TAG; FRAME_HEADER]);
    if let Err(err) = postcard::to_extend(record, Tail(out)) {
        out.truncate(start);
        return Err(err);
    }
    let payload = &out[start + FRAME_HEADER..];
    let Ok(len) = u32::try_from(payload.len()) else {
        out.truncate(start);
        return Err(postcard::Error::SerializeBufferFull);
    };
    let crc = crc32fast::hash(payload);
    out[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
    out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Postcard's writer into the end of a buffer that already holds frames
/// (its own `Vec` writer would take the buffer, and lose it on an error).
struct Tail<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Tail<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// The payload of the frame at the front of `bytes`, checked, and the
/// frame's whole length.
fn payload(bytes: &[u8]) -> Result<(&[u8], usize), String> {
    let Some(header) = bytes.get(..FRAME_HEADER) else {
        return Err("a record cut short".into());
    };
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let crc = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Err("a record cut short".into());
    };
    if crc32fast::hash(payload) != crc {
        return Err("a damaged record (CRC mismatch)".into());
    }
    Ok((payload, FRAME_HEADER + len))
}

/// Takes the next record from the front of `bytes`: `None` at their end
/// (nothing left, or the zeros past what was written), an error for a
/// frame cut short or damaged. Reads frames and, from the journals of
/// earlier Hearths, JSON lines.
pub(crate) fn decode(bytes: &mut &[u8]) -> Option<Result<UsageRecord, String>> {
    let (&first, _) = bytes.split_first()?;
    match first {
        0 => None,
        FRAME_TAG => Some(payload(bytes).and_then(|(payload, len)| {
            *bytes = &bytes[len..];
            postcard::from_bytes(payload).map_err(|e| e.to_string())
        })),
        b'{' => {
            let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
                return Some(Err("a record cut short".into()));
            };
            let record = serde_json::from_slice(&bytes[..end]).map_err(|e| e.to_string());
            *bytes = &bytes[end + 1..];
            Some(record)
        }
        other => Some(Err(format!("not a record (byte {other:#04x})"))),
    }
}

/// Records in commit order as the journal holds them: frames (what
/// [`encode`] writes). The log hands them to a [`Sink`] as they are, and a
/// sink stores the bytes and reads what it needs borrowed from them
/// ([`Frames::records`]), with no copy of their strings.
#[derive(Debug, Clone, Copy)]
pub struct Frames<'a>(pub(crate) &'a [u8]);

impl<'a> Frames<'a> {
    /// The frames' bytes.
    pub fn bytes(self) -> &'a [u8] {
        self.0
    }

    /// The records, borrowed from their frames, each checked (a damaged
    /// frame is an error, and the end).
    pub fn records(self) -> impl Iterator<Item = Result<UsageRecord<&'a str>, String>> {
        self.offsets().map(|read| read.map(|(_, record)| record))
    }

    /// The records, each copied out of its frame.
    pub fn to_records(self) -> Result<Vec<UsageRecord>, String> {
        let mut rest = self.0;
        std::iter::from_fn(|| decode(&mut rest)).collect()
    }

    /// How many records (reading only the frames' headers).
    pub fn len(self) -> usize {
        self.ends().count()
    }

    /// Whether there are none.
    pub fn is_empty(self) -> bool {
        self.0.is_empty()
    }

    /// The frames of the records with sequences above `seq`.
    pub fn after(self, seq: u64) -> Result<Frames<'a>, String> {
        for item in self.offsets() {
            let (at, record) = item?;
            if record.seq > seq {
                return Ok(Frames(&self.0[at..]));
            }
        }
        Ok(Frames(&[]))
    }

    /// Splits them into runs of at most `max` records, each with its count.
    pub(crate) fn runs(self, max: usize) -> impl Iterator<Item = (Frames<'a>, usize)> {
        let mut ends = self.ends().peekable();
        let mut start = 0;
        std::iter::from_fn(move || {
            let (mut end, mut n) = (start, 0);
            while n < max {
                let Some(next) = ends.next() else { break };
                (end, n) = (next, n + 1);
            }
            // Whatever follows a header that does not read goes with the last run.
            if ends.peek().is_none() {
                end = self.0.len();
            }
            let run = (end > start).then(|| (Frames(&self.0[start..end]), n));
            start = end;
            run
        })
    }

    /// Where each frame ends, from the headers' lengths.
    fn ends(self) -> impl Iterator<Item = usize> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let header = self.0.get(at..at + FRAME_HEADER)?;
            let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
            at = (at + FRAME_HEADER + len).min(self.0.len());
            Some(at)
        })
    }

    /// Each record with the offset of its frame.
    fn offsets(self) -> impl Iterator<Item = Result<(usize, UsageRecord<&'a str>), String>> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let rest = self.0.get(at..).filter(|rest| !rest.is_empty())?;
            let read = match rest[0] {
                FRAME_TAG => payload(rest).and_then(|(payload, len)| {
                    let record = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
                    Ok((len, record))
                }),
                other => Err(format!("not a frame (byte {other:#04x})")),
            };
            match read {
                Ok((len, record)) => {
                    let start = at;
                    at += len;
                    Some(Ok((start, record)))
                }
                Err(error) => {
                    at = self.0.len();
                    Some(Err(error))
                }
            }
        })
    }
}

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
        }
        self.map[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
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
}

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
        let fresh = Group {
            frames: Vec::with_capacity(self.queue.frames.len()),
            ..Group::default()
        };
        let group = std::mem::replace(&mut self.queue, fresh);
        let last = group.last_seq;
        self.in_flight.push_back(group);
        Some(last)
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
    let mut frames = Vec::new();
    for batch in missing.chunks(MAX_BATCH) {
        frames.clear();
        for record in batch {
            encode(record, &mut frames).map_err(|e| fail(e.to_string()))?;
        }
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

    /// A frame written today, byte for byte: journals and pages already on
    /// disk hold frames like it. If this fails, the record's fields changed:
    /// see [`FRAME_TAG`].
    #[test]
    fn frames_keep_their_layout() {
        let record = UsageRecord {
            usage: crate::Usage {
                id: "0193a0e8-0000-7000-8000-000000000001".into(),
                invocation_id: Some("0193a0e8-0000-7000-8000-000000000000".into()),
                attempt: 2,
                tenant: "acme".into(),
                function: "ocr".into(),
                version: 3,
                alias: "prod".into(),
                shadow: true,
                started_at_us: 1_764_000_000_000_000,
                ended_at_us: 1_764_000_000_002_500,
                status: 503,
                outcome: Outcome::CacheHit,
                cold_start: true,
                queue_us: 10,
                memory_peak_bytes: 1 << 20,
                guest_cpu_us: 300,
                device: "cpu+cuda:0".into(),
                compute_ns: 7_000,
                gpu_ns: 5_000,
                inference_calls: 2,
                batched_calls: 6,
                inference_cache_hits: 1,
                bytes_in: 5,
                bytes_out: 120,
            },
            cost_nanos: -42,
            currency: "EUR".into(),
            price_version: "2026-12".into(),
            seq: 1_000_000,
        };
        let mut frame = Vec::new();
        encode(&record, &mut frame).expect("encode");
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "b79a0000000dd562ab2430313933613065382d303030302d373030302d383030",
                "302d303030303030303030303031012430313933613065382d303030302d3730",
                "30302d383030302d303030303030303030303030020461636d65036f63720304",
                "70726f640180809296a896a20688a79296a896a206f70308010a808040ac020a",
                "6370752b637564613a30d83688270206010578530345555207323032362d3132",
                "c0843d"
            )
        );
        assert_eq!(decode(&mut &frame[..]).expect("a record").expect("whole"), record);
    }

    #[test]
    fn frames_read_back_and_torn_or_damaged_ones_are_told_apart() {
        let record = UsageRecord {
            seq: 7,
            ..crate::PriceTable::default().price(crate::tests::usage("id-7", Outcome::GuestTrap))
        };
        let mut frame = Vec::new();
        encode(&record, &mut frame).expect("encode");
        let json = serde_json::to_vec(&record).expect("json");
        assert!(
            frame.len() * 2 < json.len(),
            "{} bytes against JSON's {}",
            frame.len(),
            json.len()
        );

        // Frames, an earlier Hearth's JSON line, then a mapped file's zeros.
        let mut bytes = [frame.clone(), frame.clone(), json, b"\n".to_vec(), vec![0; 16]].concat();
        let mut rest = &bytes[..];
        for _ in 0..3 {
            assert_eq!(decode(&mut rest).expect("a record").expect("whole"), record);
        }
        assert!(decode(&mut rest).is_none(), "the zeros end it");

        for cut in [&frame[..frame.len() - 1], &frame[..4]] {
            assert!(decode(&mut &cut[..]).expect("a record").is_err(), "cut short");
        }
        let last = frame.len() - 1;
        bytes[last] ^= 0x40;
        assert!(decode(&mut &bytes[..]).expect("a record").is_err(), "damaged");
    }

    #[test]
    fn frames_split_into_runs_and_skip_what_is_stored() {
        let records: Vec<UsageRecord> = (1..=7)
            .map(|seq| UsageRecord {
                seq,
                ..crate::PriceTable::default().price(crate::tests::usage(&format!("id-{seq}"), Outcome::Ok))
            })
            .collect();
        let mut bytes = Vec::new();
        for record in &records {
            encode(record, &mut bytes).expect("encode");
        }
        let frames = Frames(&bytes);
        assert_eq!(frames.len(), 7);
        let runs: Vec<(Vec<UsageRecord>, usize)> = frames
            .runs(3)
            .map(|(run, n)| (run.to_records().expect("run"), n))
            .collect();
        assert_eq!(runs.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [3, 3, 1]);
        assert_eq!(runs.into_iter().flat_map(|(run, _)| run).collect::<Vec<_>>(), records);
        assert_eq!(
            frames.after(4).expect("after").to_records().expect("read"),
            records[4..]
        );
        assert!(frames.after(7).expect("after").is_empty());
        for (borrowed, owned) in frames.records().zip(&records) {
            let borrowed = borrowed.expect("a record");
            assert_eq!(
                (
                    borrowed.usage.id,
                    borrowed.usage.tenant,
                    borrowed.currency,
                    borrowed.seq
                ),
                (
                    owned.usage.id.as_str(),
                    owned.usage.tenant.as_str(),
                    owned.currency.as_str(),
                    owned.seq
                )
            );
        }
        bytes[20] ^= 1;
        assert!(Frames(&bytes).records().next().expect("one").is_err(), "damaged");
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
            encode(&record, &mut frame).expect("encode");
            segment.append(&frame).expect("append");
        }
        assert!(segment.map.len() > SEGMENT_START_BYTES);
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
