//! The usage journal's files: each record is a frame ([`encode`]) appended
//! to a file mapped into memory ([`Segment`]); on start, what a crash left
//! in them is ingested ([`recover_journal`]). The log (`log.rs`) decides
//! when they are synced, rewritten and rotated.

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
    *out = postcard::to_extend(record, std::mem::take(out))?;
    let payload = &out[start + FRAME_HEADER..];
    let len = u32::try_from(payload.len()).map_err(|_| postcard::Error::SerializeBufferFull)?;
    let crc = crc32fast::hash(payload);
    out[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
    out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Takes the next record from the front of `bytes`: `None` at their end
/// (nothing left, or the zeros past what was written), an error for a
/// frame cut short or damaged. Reads frames and, from the journals of
/// earlier Hearths, JSON lines.
pub(crate) fn decode(bytes: &mut &[u8]) -> Option<Result<UsageRecord, String>> {
    let (&first, _) = bytes.split_first()?;
    match first {
        0 => None,
        FRAME_TAG => {
            let Some(header) = bytes.get(..FRAME_HEADER) else {
                return Some(Err("a record cut short".into()));
            };
            let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let crc = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
            let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
                return Some(Err("a record cut short".into()));
            };
            if crc32fast::hash(payload) != crc {
                return Some(Err("a damaged record (CRC mismatch)".into()));
            }
            let record = postcard::from_bytes(payload).map_err(|e| e.to_string());
            *bytes = &bytes[FRAME_HEADER + len..];
            Some(record)
        }
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

/// The append side: the journal file and the records in it not yet ingested.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(crate) dir: PathBuf,
    /// `None` after a failed write, until the syncer has reopened it.
    pub(crate) file: Option<Segment>,
    pub(crate) number: u64,
    pub(crate) next_seq: u64,
    /// Written to the journal, not yet taken by the syncer.
    pub(crate) queue: Vec<UsageRecord>,
    /// Taken by the syncer (synced, or being synced), not yet taken by an
    /// ingester (written again to a new journal if an fsync fails, carried
    /// into the next one when the journal rotates).
    pub(crate) in_flight: Vec<UsageRecord>,
    pub(crate) buf: Vec<u8>,
}

impl Journal {
    pub(crate) fn path(dir: &Path, number: u64) -> PathBuf {
        dir.join(format!("journal-{number:08}.log"))
    }

    /// The next journal file, starting with every record not yet ingested
    /// (`in_flight`, then `queue`), which it carries over from the current
    /// one. Appends go on to the current file until [`Journal::switch_to`].
    pub(crate) fn next_segment(&self) -> std::io::Result<Segment> {
        let mut frames = Vec::new();
        for record in self.in_flight.iter().chain(&self.queue) {
            encode(record, &mut frames).map_err(std::io::Error::other)?;
        }
        Segment::create(&self.dir, self.number + 1, &frames)
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
        sink.write(batch).map_err(fail)?;
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
        fn write(&mut self, batch: &[UsageRecord]) -> Result<(), String> {
            self.0.extend_from_slice(batch);
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
