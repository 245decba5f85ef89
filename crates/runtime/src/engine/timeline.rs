//! The engine's timeline: one span per stage of every extent and fetch (pack, write, read,
//! unpack, forwarded copy, caller stall), exportable as Chrome trace JSON. Open the file in
//! Perfetto (ui.perfetto.dev) or chrome://tracing to see whether I/O overlapped compute.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

/// The rows of the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// Waiting for producers and packing tensors into staging (the offload stream).
    Pack,
    /// Storage writes.
    Write,
    /// Storage reads (prefetch and demand).
    Read,
    /// Copies into the caller's buffers: unpacks and forwarded copies.
    Deliver,
    /// Time `fetch` callers were blocked.
    Stall,
    /// Device copies into the host tier (offloads taken by pinned host memory).
    TierIn,
    /// Host tier bytes written to storage in the background.
    TierSpill,
    /// Device copies out of the host tier (reads it answered).
    TierOut,
}

const TRACKS: [Track; 8] = [
    Track::Pack,
    Track::Write,
    Track::Read,
    Track::Deliver,
    Track::Stall,
    Track::TierIn,
    Track::TierSpill,
    Track::TierOut,
];

impl Track {
    fn id(self) -> u64 {
        self as u64 + 1
    }

    fn name(self) -> &'static str {
        match self {
            Track::Pack => "pack",
            Track::Write => "storage write",
            Track::Read => "storage read",
            Track::Deliver => "deliver to caller",
            Track::Stall => "caller stalled",
            Track::TierIn => "host tier: copy in",
            Track::TierSpill => "host tier: spill to storage",
            Track::TierOut => "host tier: copy out",
        }
    }
}

#[derive(Clone, Debug)]
struct Span {
    track: Track,
    name: &'static str,
    start_us: f64,
    dur_us: f64,
    bytes: u64,
}

/// A bounded recorder of spans.
#[derive(Debug)]
pub struct Timeline {
    enabled: bool,
    capacity: usize,
    origin: Instant,
    spans: Mutex<Vec<Span>>,
    dropped: AtomicU64,
}

impl Timeline {
    /// A timeline that records at most `capacity` spans, or nothing when not `enabled`.
    pub fn new(enabled: bool, capacity: usize) -> Self {
        Timeline {
            enabled,
            capacity,
            origin: Instant::now(),
            spans: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether spans are recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records a span of `bytes` bytes on `track` from `start` to `end`.
    pub fn record(&self, track: Track, name: &'static str, start: Instant, end: Instant, bytes: u64) {
        if !self.enabled {
            return;
        }
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if spans.len() >= self.capacity {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let at = |t: Instant| t.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        spans.push(Span {
            track,
            name,
            start_us: at(start),
            dur_us: (at(end) - at(start)).max(0.0),
            bytes,
        });
    }

    /// Spans recorded so far.
    pub fn len(&self) -> usize {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spans dropped because the timeline was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes the timeline as Chrome trace JSON (the "JSON object" format, with one
    /// complete event per span and named rows).
    pub fn write_chrome_trace(&self, mut out: impl Write) -> std::io::Result<()> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut events = Vec::with_capacity(spans.len() + TRACKS.len() + 1);
        events
            .push(json!({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "spillway engine"}}));
        for t in TRACKS {
            events.push(json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": t.id(), "args": {"name": t.name()}}));
            events.push(json!({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": t.id(), "args": {"sort_index": t.id()}}));
        }
        for s in &spans {
            events.push(json!({
                "ph": "X", "pid": 1, "tid": s.track.id(), "name": s.name, "cat": s.track.name(),
                "ts": s.start_us, "dur": s.dur_us, "args": {"bytes": s.bytes},
            }));
        }
        let doc = json!({
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"dropped_spans": self.dropped()},
        });
        serde_json::to_writer(&mut out, &doc)?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn spans_export_as_chrome_trace_and_the_capacity_holds() {
        let t = Timeline::new(true, 2);
        let a = Instant::now();
        let b = a + Duration::from_micros(50);
        t.record(Track::Write, "write", a, b, 4096);
        t.record(Track::Read, "read", a, b, 8192);
        t.record(Track::Read, "read", a, b, 8192);
        assert_eq!((t.len(), t.dropped()), (2, 1));
        let mut out = Vec::new();
        t.write_chrome_trace(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let spans: Vec<_> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .collect();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0]["args"]["bytes"], 4096);
        assert!((spans[0]["dur"].as_f64().unwrap() - 50.0).abs() < 1.0);
        assert_eq!(v["otherData"]["dropped_spans"], 1);
    }

    #[test]
    fn a_disabled_timeline_records_nothing() {
        let t = Timeline::new(false, 10);
        let now = Instant::now();
        t.record(Track::Pack, "pack", now, now, 1);
        assert!(t.is_empty());
    }
}
