//! Export formats: CSV, JSON lines and CloudEvents (JSON lines of
//! structured-mode events). Each encodes one record at a time, so exports
//! stream page by page.

use crate::record::{RecordView, UsageRecord};

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// One CloudEvents 1.0 structured-mode JSON event per line; the record id
    /// is the event id (consumers deduplicate on it) and the tenant the subject.
    CloudEvents,
}

impl Format {
    /// Parses `csv`, `jsonl` or `cloudevents`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            "cloudevents" => Some(Format::CloudEvents),
            _ => None,
        }
    }

    /// The media type of the whole export.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Jsonl => "application/jsonl",
            Format::CloudEvents => "application/cloudevents+jsonl",
        }
    }
}

/// The CloudEvents `type` of usage records.
pub const EVENT_TYPE: &str = "dev.hearth.usage.v1";

/// Encodes records in one format; `header` goes first (CSV only).
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    source: String,
}

impl Encoder {
    /// An encoder; `source` is the CloudEvents source (the server's URL).
    pub fn new(format: Format, source: impl Into<String>) -> Encoder {
        Encoder {
            format,
            source: source.into(),
        }
    }

    /// What comes before the first record.
    pub fn header(&self) -> Vec<u8> {
        match self.format {
            Format::Csv => {
                let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
                let _ = writer.write_record(CSV_COLUMNS);
                writer.into_inner().unwrap_or_default()
            }
            Format::Jsonl | Format::CloudEvents => Vec::new(),
        }
    }

    /// One record, with its line ending.
    pub fn record(&self, record: &UsageRecord) -> Vec<u8> {
        let view = RecordView::from(record);
        match self.format {
            Format::Csv => {
                let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
                let _ = writer.serialize(&view);
                writer.into_inner().unwrap_or_default()
            }
            Format::Jsonl => {
                let mut line = serde_json::to_vec(&view).unwrap_or_default();
                line.push(b'\n');
                line
            }
            Format::CloudEvents => {
                let event = serde_json::json!({
                    "specversion": "1.0",
                    "id": view.id,
                    "source": self.source,
                    "type": EVENT_TYPE,
                    "subject": view.tenant,
                    "time": view.ended_at,
                    "datacontenttype": "application/json",
                    "data": view,
                });
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                line
            }
        }
    }
}

/// CSV header, in [`RecordView`]'s field order.
pub const CSV_COLUMNS: [&str; 29] = [
    "id",
    "invocation_id",
    "attempt",
    "tenant",
    "function",
    "version",
    "alias",
    "shadow",
    "started_at",
    "ended_at",
    "status",
    "outcome",
    "cold_start",
    "wall_ms",
    "billed_ms",
    "queue_ms",
    "memory_peak_bytes",
    "guest_cpu_us",
    "device",
    "compute_ms",
    "gpu_ms",
    "inference_calls",
    "batched_with",
    "inference_cache_hits",
    "bytes_in",
    "bytes_out",
    "cost",
    "currency",
    "price_version",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    #[test]
    fn the_three_formats_agree() {
        let table = crate::PriceTable::default();
        let record = table.price(crate::tests::usage("0193a0e8-0000-7000-8000-000000000001", Outcome::Ok));
        let view = RecordView::from(&record);

        let csv_bytes = [
            Encoder::new(Format::Csv, "x").header(),
            Encoder::new(Format::Csv, "x").record(&record),
        ]
        .concat();
        let mut reader = csv::Reader::from_reader(&csv_bytes[..]);
        let headers: Vec<String> = reader.headers().expect("header").iter().map(str::to_owned).collect();
        assert_eq!(headers, CSV_COLUMNS);
        let from_csv: RecordView = reader.deserialize().next().expect("row").expect("parse");
        assert_eq!(from_csv, view);

        let line = Encoder::new(Format::Jsonl, "x").record(&record);
        let from_json: RecordView = serde_json::from_slice(&line).expect("jsonl");
        assert_eq!(from_json, view);

        let event: serde_json::Value =
            serde_json::from_slice(&Encoder::new(Format::CloudEvents, "http://h").record(&record)).expect("event");
        assert_eq!(event["id"], view.id.as_str());
        assert_eq!(event["subject"], view.tenant.as_str());
        assert_eq!(event["type"], EVENT_TYPE);
        let data: RecordView = serde_json::from_value(event["data"].clone()).expect("data");
        assert_eq!(data, view);
    }
}
