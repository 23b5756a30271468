//! The usage record's frame: how the journal and the pages of `usage.db`
//! hold a record ([`encode`], [`decode`]), and [`Frames`], the records a
//! sink is handed, read borrowed from their bytes.

use crate::record::{Priced, UsageRecord};

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
pub(crate) fn encode(record: Priced<'_>, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let start = out.len();
    out.extend_from_slice(&[FRAME_TAG; FRAME_HEADER]);
    if let Err(err) = postcard::to_extend(&record, Tail(out)) {
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

/// The frames of `records`, one after the other, as the log hands them to
/// a sink.
pub(crate) fn encode_all(records: &[UsageRecord]) -> Result<Vec<u8>, postcard::Error> {
    let mut frames = Vec::new();
    for record in records {
        encode(record.as_priced(), &mut frames)?;
    }
    Ok(frames)
}

/// Postcard's writer into the end of a buffer that already holds frames
/// (its own `Vec` writer would take the buffer, and lose it on an error).
struct Tail<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Tail<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// The payload length a frame's header gives.
fn payload_len(header: &[u8]) -> usize {
    u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize
}

/// The payload of the frame at the front of `bytes`, checked, and the
/// frame's whole length.
fn payload(bytes: &[u8]) -> Result<(&[u8], usize), String> {
    let Some(header) = bytes.get(..FRAME_HEADER) else {
        return Err("a record cut short".into());
    };
    let len = payload_len(header);
    let crc = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Err("a record cut short".into());
    };
    if crc32fast::hash(payload) != crc {
        return Err("a damaged record (CRC mismatch)".into());
    }
    Ok((payload, FRAME_HEADER + len))
}

/// Reads the record of the frame at the front of `bytes` (owned, or
/// borrowed from them), checked, and the frame's whole length.
fn read<'de, T: serde::Deserialize<'de>>(bytes: &'de [u8]) -> Result<(T, usize), String> {
    let (payload, len) = payload(bytes)?;
    let record = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
    Ok((record, len))
}

/// Takes the next record from the front of `bytes`: `None` at their end
/// (nothing left, or the zeros past what was written), an error for a
/// frame cut short or damaged. Reads frames and, from the journals of
/// earlier Hearths, JSON lines.
pub(crate) fn decode(bytes: &mut &[u8]) -> Option<Result<UsageRecord, String>> {
    let (&first, _) = bytes.split_first()?;
    match first {
        0 => None,
        FRAME_TAG => Some(read(bytes).map(|(record, len)| {
            *bytes = &bytes[len..];
            record
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

/// Records in commit order as the journal holds them: frames, each a
/// header (a tag byte, the payload's length and CRC-32) and the record in
/// postcard's encoding. The log hands them to a [`Sink`](crate::Sink) as
/// they are, and a sink stores the bytes and reads what it needs borrowed
/// from them ([`Frames::records`]), with no copy of their strings.
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
            at = (at + FRAME_HEADER + payload_len(header)).min(self.0.len());
            Some(at)
        })
    }

    /// Each record with the offset of its frame.
    fn offsets(self) -> impl Iterator<Item = Result<(usize, UsageRecord<&'a str>), String>> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let rest = self.0.get(at..).filter(|rest| !rest.is_empty())?;
            let read = match rest[0] {
                FRAME_TAG => read(rest),
                other => Err(format!("not a frame (byte {other:#04x})")),
            };
            match read {
                Ok((record, len)) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

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
        encode(record.as_priced(), &mut frame).expect("encode");
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
        encode(record.as_priced(), &mut frame).expect("encode");
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
        let mut bytes = encode_all(&records).expect("encode");
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
}
