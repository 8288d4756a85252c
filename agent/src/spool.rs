//! The durable spool: what makes "nothing is lost" true between the monitor and the broker.
//!
//! ## Why a log of our own
//! The requirements are narrow: append an event and make it durable before publishing it,
//! drop it only when the broker's PUBACK for it arrives, replay what is left in order after
//! any outage or restart, persist `seq`, survive `kill -9` and power loss mid-write, stay
//! bounded. An embedded database would do all that and much more, at the cost of a large
//! dependency and write amplification on an SD card. An append-only log with checksummed
//! records does exactly this, and its failure modes are easy to test. (Vector's disk buffer
//! is the model: length + CRC per record, increasing ids, delete only what was acknowledged,
//! a filesystem seam for fault tests.)
//!
//! ## Format (`spool.log`)
//! ```text
//! record = "MS" · kind:u8 · len:u32 LE · crc32(kind · payload):u32 LE · payload
//! kind 1 Meta      payload = next_seq:u64 LE          (first record after a compaction)
//! kind 2 Event     payload = the event's MQTT JSON      (seq inside)
//! kind 3 Acked     payload = seq:u64 LE
//! kind 4 Telemetry payload = a snapshot's MQTT JSON, kept while the broker is unreachable
//! ```
//! - An event record is written and `fsync`ed before the event is published.
//! - An `Acked` record is written (not synced: losing one only means the event is sent once
//!   more, and the gateway de-duplicates by `(home, seq)`).
//! - On open, records are read until the first one that is short, has a bad magic or a bad
//!   CRC: that is a torn tail from a crash mid-write. The file is truncated there; everything
//!   before it is kept.
//! - When most of the file is dead (acknowledged events and their `Acked` records, more than
//!   64 KiB and more than what is still live), or everything is acknowledged, it is compacted:
//!   the pending records are written to `spool.log.tmp`, synced, and renamed over the log. So
//!   a replay after a long outage rewrites each byte a bounded number of times.
//! - `seq` is strictly increasing and survives restarts: it is the largest seq ever written
//!   plus one. A brand-new spool starts at the wall clock in milliseconds, so an agent whose
//!   SD card was replaced still never reuses a seq the gateway has seen.
//!
//! ## When it is full or the disk fails
//! Telemetry kept during an outage is dropped first, oldest first. Events are never dropped:
//! if one cannot be written (disk full, capacity reached by events alone), it is kept in memory,
//! published as usual, and the spool reports itself degraded so the family is warned and the
//! gateway told (`spool_degraded`). The next successful write persists the held events.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use mamori_protocol::mqtt::{self, Event, SpoolStatus};

const MAGIC: [u8; 2] = *b"MS";
const HEADER: usize = 2 + 1 + 4 + 4;
/// Largest record accepted when reading (an MQTT payload is at most 16 KiB).
const MAX_RECORD: usize = mqtt::MAX_PAYLOAD_BYTES + 64;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

const META: u8 = 1;
const EVENT: u8 = 2;
const ACKED: u8 = 3;
const TELEMETRY: u8 = 4;

/// Where the spool's bytes live: the filesystem seam that the fault tests replace.
pub trait Storage {
    /// The whole log.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Append bytes at the end.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Make everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cut the log to `len` bytes (dropping a torn tail).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Atomically replace the whole log with `bytes`.
    fn replace(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// The spool on disk: `dir/spool.log`.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
    file: File,
}

impl FileStorage {
    /// Open (creating) `dir/spool.log`.
    pub fn open(dir: &Path) -> io::Result<FileStorage> {
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new().read(true).append(true).create(true).open(dir.join("spool.log"))?;
        Ok(FileStorage { dir: dir.to_path_buf(), file })
    }
}

impl Storage for FileStorage {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let before = self.file.metadata()?.len();
        if let Err(e) = self.file.write_all(bytes) {
            // Never leave half a record behind when we can help it.
            let _ = self.file.set_len(before);
            return Err(e);
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("spool.log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join("spool.log"))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().read(true).append(true).open(self.dir.join("spool.log"))?;
        Ok(())
    }
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Events waiting for a PUBACK.
    pub pending_events: usize,
    /// Telemetry snapshots kept from an outage.
    pub telemetry: usize,
    /// Bytes of a torn tail that were dropped.
    pub torn_bytes: u64,
}

/// An event in the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct Spooled {
    /// The event.
    pub event: Event,
    /// Its JSON, exactly as it will be published.
    pub payload: Vec<u8>,
    /// Written to disk (false while the disk refuses writes).
    pub durable: bool,
}

/// The spool.
pub struct Spool<S: Storage> {
    storage: S,
    capacity_bytes: u64,
    len_bytes: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Spooled>,
    telemetry: VecDeque<Vec<u8>>,
    /// Bytes of the file that a compaction would keep (the rest is acknowledged events).
    live_bytes: u64,
    degraded: bool,
}

fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut digest = CRC.digest();
    digest.update(&[kind]);
    digest.update(payload);
    let mut r = Vec::with_capacity(HEADER + payload.len());
    r.extend_from_slice(&MAGIC);
    r.push(kind);
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&digest.finalize().to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// Parse records from `buf`; returns them and the length of the valid prefix.
fn parse(buf: &[u8]) -> (Vec<(u8, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER {
        let h = &buf[at..at + HEADER];
        let kind = h[2];
        let len = u32::from_le_bytes([h[3], h[4], h[5], h[6]]) as usize;
        let crc = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
        if h[..2] != MAGIC || len > MAX_RECORD || buf.len() - at - HEADER < len {
            break;
        }
        let payload = &buf[at + HEADER..at + HEADER + len];
        let mut digest = CRC.digest();
        digest.update(&[kind]);
        digest.update(payload);
        if digest.finalize() != crc {
            break;
        }
        out.push((kind, payload));
        at += HEADER + len;
    }
    (out, at)
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    payload.try_into().ok().map(u64::from_le_bytes)
}

/// A spool error that stops the agent (opening only: later write failures degrade instead).
#[derive(Debug, thiserror::Error)]
#[error("spool: {0}")]
pub struct SpoolError(#[from] io::Error);

impl<S: Storage> Spool<S> {
    /// Open the spool, recovering what a previous run left. `now_unix_ms` seeds `seq` for a
    /// brand-new spool.
    pub fn open(mut storage: S, capacity_bytes: u64, now_unix_ms: u64) -> Result<(Spool<S>, Recovery), SpoolError> {
        let buf = storage.read_all()?;
        let (records, valid) = parse(&buf);
        let torn = (buf.len() - valid) as u64;
        if torn > 0 {
            storage.truncate(valid as u64)?;
        }
        let mut pending = BTreeMap::new();
        let mut telemetry = VecDeque::new();
        let mut max_seq = 0u64;
        let mut meta_next = None;
        for (kind, payload) in records {
            match kind {
                META => meta_next = seq_of(payload),
                EVENT => {
                    // A record that passed its CRC but does not parse is skipped, not fatal.
                    if let Ok(event) = mqtt::decode::<Event>(payload) {
                        max_seq = max_seq.max(event.seq);
                        pending.insert(event.seq, Spooled { event, payload: payload.to_vec(), durable: true });
                    }
                }
                ACKED => {
                    if let Some(seq) = seq_of(payload) {
                        max_seq = max_seq.max(seq);
                        pending.remove(&seq);
                    }
                }
                TELEMETRY => telemetry.push_back(payload.to_vec()),
                _ => {}
            }
        }
        let next_seq = match (meta_next, max_seq, valid) {
            (_, _, 0) => now_unix_ms.max(1),
            (Some(m), s, _) => m.max(s + 1),
            (None, s, _) => (s + 1).max(1),
        };
        let recovery = Recovery { pending_events: pending.len(), telemetry: telemetry.len(), torn_bytes: torn };
        let mut spool = Spool {
            storage,
            capacity_bytes,
            len_bytes: valid as u64,
            next_seq,
            pending,
            telemetry,
            live_bytes: 0,
            degraded: false,
        };
        spool.live_bytes = spool.live_now();
        if valid == 0 {
            // Persist the seed so the first seq survives a crash before the first event.
            spool.compact()?;
        }
        Ok((spool, recovery))
    }

    /// The seq the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether events are being held in memory because the disk refused them.
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// Events waiting for a PUBACK, in seq order.
    pub fn pending(&self) -> impl Iterator<Item = &Spooled> {
        self.pending.values()
    }

    /// Whether `seq` is still waiting for a PUBACK.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.pending.contains_key(&seq)
    }

    /// The spool's health, for telemetry.
    pub fn status(&self) -> SpoolStatus {
        SpoolStatus { pending_events: self.pending.len() as u32, degraded: self.degraded }
    }

    fn write(&mut self, kind: u8, payload: &[u8], sync: bool) -> io::Result<()> {
        let r = record(kind, payload);
        if self.len_bytes + r.len() as u64 > self.capacity_bytes {
            self.make_room(r.len() as u64)?;
        }
        self.storage.append(&r)?;
        if sync {
            self.storage.sync()?;
        }
        self.len_bytes += r.len() as u64;
        if kind != ACKED {
            self.live_bytes += r.len() as u64;
        }
        Ok(())
    }

    /// What a compaction would write: the meta record, pending durable events, telemetry.
    fn live_now(&self) -> u64 {
        self.pending.values().filter(|s| s.durable).map(|s| (HEADER + s.payload.len()) as u64).sum::<u64>()
            + self.telemetry.iter().map(|t| (HEADER + t.len()) as u64).sum::<u64>()
            + (HEADER + 8) as u64
    }

    /// Compact, dropping the oldest telemetry until `need` more bytes fit.
    fn make_room(&mut self, need: u64) -> io::Result<()> {
        loop {
            let live = self.live_now();
            if live + need <= self.capacity_bytes {
                return self.compact();
            }
            if self.telemetry.pop_front().is_none() {
                self.compact()?;
                return Err(io::Error::new(io::ErrorKind::StorageFull, "spool capacity reached by events alone"));
            }
        }
    }

    /// Rewrite the log with only what is still needed.
    fn compact(&mut self) -> io::Result<()> {
        let mut buf = record(META, &self.next_seq.to_le_bytes());
        for s in self.pending.values().filter(|s| s.durable) {
            buf.extend(record(EVENT, &s.payload));
        }
        for t in &self.telemetry {
            buf.extend(record(TELEMETRY, t));
        }
        self.storage.replace(&buf)?;
        self.len_bytes = buf.len() as u64;
        self.live_bytes = self.len_bytes;
        Ok(())
    }

    /// Try to persist events held in memory; true when none are left.
    fn persist_held(&mut self) -> bool {
        let held: Vec<u64> = self.pending.iter().filter(|(_, s)| !s.durable).map(|(&q, _)| q).collect();
        for seq in held {
            let payload = self.pending[&seq].payload.clone();
            if self.write(EVENT, &payload, true).is_err() {
                return false;
            }
            if let Some(s) = self.pending.get_mut(&seq) {
                s.durable = true;
            }
        }
        true
    }

    /// Give `event` the next seq and its id, make it durable, and return it for publishing. A write
    /// failure does not lose it: it is held in memory and the spool becomes degraded
    /// (check [`Spool::degraded`] after each call).
    /// The event's `id` is taken as a prefix (the agent's boot id): the stored id is
    /// `{prefix}-{seq}`.
    pub fn append(&mut self, mut event: Event) -> &Spooled {
        event.seq = self.next_seq;
        event.id = format!("{}-{}", event.id, event.seq);
        self.next_seq += 1;
        let payload = mqtt::encode(&event);
        let seq = event.seq;
        let held_ok = !self.degraded || self.persist_held();
        let durable = held_ok && self.write(EVENT, &payload, true).is_ok();
        self.degraded = !durable || self.pending.values().any(|s| !s.durable);
        self.pending.entry(seq).or_insert(Spooled { event, payload, durable })
    }

    /// Try again to write events held in memory (call when idle); true once none are held.
    pub fn retry_held(&mut self) -> bool {
        if self.degraded && self.persist_held() {
            self.degraded = false;
        }
        !self.degraded
    }

    /// The broker acknowledged `seq`: forget it.
    pub fn ack(&mut self, seq: u64) {
        let Some(s) = self.pending.remove(&seq) else { return };
        if s.durable {
            self.live_bytes = self.live_bytes.saturating_sub((HEADER + s.payload.len()) as u64);
            // Not synced: losing it only means one more (de-duplicated) delivery.
            if self.write(ACKED, &seq.to_le_bytes(), false).is_err() {
                return;
            }
        }
        // Compact when most of the file is dead, so each byte is rewritten a bounded number
        // of times however long the replay (compacting on size alone would rewrite a spool
        // full of kept telemetry on every acknowledgement).
        let dead = self.len_bytes.saturating_sub(self.live_bytes);
        let drained = self.pending.is_empty() && self.telemetry.is_empty() && self.len_bytes > 64 * 1024;
        if drained || (dead > 64 * 1024 && dead > self.live_bytes) {
            let _ = self.compact();
        }
    }

    /// Keep a telemetry snapshot taken while the broker is unreachable.
    pub fn keep_telemetry(&mut self, payload: Vec<u8>) {
        if self.write(TELEMETRY, &payload, false).is_ok() {
            self.telemetry.push_back(payload);
        }
    }

    /// Take the telemetry kept during an outage (oldest first), to publish after the events.
    pub fn take_telemetry(&mut self) -> Vec<Vec<u8>> {
        let t: Vec<_> = self.telemetry.drain(..).collect();
        if !t.is_empty() {
            let _ = self.compact();
        }
        t
    }

    /// Flush what is buffered (on shutdown).
    pub fn flush(&mut self) -> io::Result<()> {
        self.storage.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamori_protocol::mqtt::EventKind;
    use std::cell::Cell;
    use std::rc::Rc;

    fn event(kind: EventKind) -> Event {
        Event {
            id: "boot:0".into(),
            seq: 1,
            ts: chrono::DateTime::parse_from_rfc3339("2026-11-22T03:00:00+09:00").unwrap(),
            kind,
            severity: kind.default_severity(),
            source: Some("ups".into()),
            data: Default::default(),
            clock: None,
        }
    }

    fn open(dir: &Path) -> (Spool<FileStorage>, Recovery) {
        Spool::open(FileStorage::open(dir).unwrap(), 1 << 20, 1_700_000_000_000).unwrap()
    }

    #[test]
    fn seq_starts_at_the_clock_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, r) = open(dir.path());
        assert_eq!(r, Recovery::default());
        assert_eq!(s.next_seq(), 1_700_000_000_000);
        let a = s.append(event(EventKind::MainsLost)).event.seq;
        let b = s.append(event(EventKind::BatteryLow)).event.seq;
        assert_eq!(b, a + 1);
        s.ack(a);
        s.ack(b);
        drop(s);
        let (s, r) = open(dir.path());
        assert_eq!(r.pending_events, 0);
        assert_eq!(s.next_seq(), b + 1, "seq survives even when everything was acknowledged");
    }

    #[test]
    fn unacknowledged_events_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path());
        let seqs: Vec<u64> = (0..5).map(|_| s.append(event(EventKind::DeviceLost)).event.seq).collect();
        s.ack(seqs[1]);
        s.ack(seqs[3]);
        drop(s);
        let (s, r) = open(dir.path());
        assert_eq!(r.pending_events, 3);
        let left: Vec<u64> = s.pending().map(|p| p.event.seq).collect();
        assert_eq!(left, [seqs[0], seqs[2], seqs[4]]);
        assert!(s.pending().all(|p| p.durable && mqtt::decode::<Event>(&p.payload).unwrap() == p.event));
    }

    #[test]
    fn a_torn_tail_is_dropped_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path());
        let a = s.append(event(EventKind::MainsLost)).event.seq;
        let b = s.append(event(EventKind::MainsRestored)).event.seq;
        drop(s);
        // A crash in the middle of writing a third record.
        let path = dir.path().join("spool.log");
        let full = fs::read(&path).unwrap();
        let third = record(
            EVENT,
            br#"{"id":"x","seq":99,"ts":"2026-11-22T03:00:00Z","kind":"mains_lost","severity":"critical"}"#,
        );
        for cut in [1, HEADER - 1, HEADER + 5, third.len() - 1] {
            let mut torn = full.clone();
            torn.extend_from_slice(&third[..cut]);
            fs::write(&path, &torn).unwrap();
            let (s, r) = open(dir.path());
            assert_eq!(r.torn_bytes, cut as u64);
            assert_eq!(s.pending().map(|p| p.event.seq).collect::<Vec<_>>(), [a, b]);
            assert_eq!(fs::read(&path).unwrap(), full, "truncated back to the last good record");
        }
        // Garbage in the middle of the last record's payload fails its CRC: dropped too.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        let (s, r) = open(dir.path());
        assert!(r.torn_bytes > 0);
        assert_eq!(s.pending().map(|p| p.event.seq).collect::<Vec<_>>(), [a]);
    }

    #[test]
    fn compaction_keeps_only_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(FileStorage::open(dir.path()).unwrap(), 64 * 1024, 1).unwrap();
        let mut last = 0;
        for i in 0..2000 {
            let seq = s.append(event(EventKind::DeviceLost)).event.seq;
            if i % 100 != 99 {
                s.ack(seq);
            }
            last = seq;
        }
        let size = fs::metadata(dir.path().join("spool.log")).unwrap().len();
        assert!(size <= 64 * 1024, "bounded: {size}");
        assert!(!s.degraded());
        drop(s);
        let (s, r) = Spool::open(FileStorage::open(dir.path()).unwrap(), 64 * 1024, 1).unwrap();
        assert_eq!(r.pending_events, 20);
        assert_eq!(s.next_seq(), last + 1);
    }

    #[test]
    fn when_full_old_telemetry_goes_first_and_events_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(FileStorage::open(dir.path()).unwrap(), 64 * 1024, 1).unwrap();
        for i in 0..200u32 {
            s.keep_telemetry(format!("{{\"snapshot\":{i},\"pad\":\"{}\"}}", "x".repeat(400)).into_bytes());
        }
        let seqs: Vec<u64> = (0..20).map(|_| s.append(event(EventKind::MainsLost)).event.seq).collect();
        assert!(!s.degraded());
        let kept = s.take_telemetry();
        assert!(kept.len() < 200, "old telemetry was dropped");
        assert!(String::from_utf8_lossy(kept.last().unwrap()).contains("\"snapshot\":199"), "the newest kept");
        assert_eq!(s.pending().map(|p| p.event.seq).collect::<Vec<_>>(), seqs);
    }

    #[test]
    fn replaying_after_a_long_outage_does_not_rewrite_the_spool_on_every_ack() {
        let dir = tempfile::tempdir().unwrap();
        let rewrites = Rc::new(Cell::new(0));
        let storage = TestDisk {
            inner: FileStorage::open(dir.path()).unwrap(),
            room: Rc::new(Cell::new(u64::MAX)),
            rewrites: rewrites.clone(),
        };
        let (mut s, _) = Spool::open(storage, 400 * 1024, 1).unwrap();
        // A long outage: much telemetry kept, then many events.
        for i in 0..300u32 {
            s.keep_telemetry(format!("{{\"snapshot\":{i},\"pad\":\"{}\"}}", "x".repeat(500)).into_bytes());
        }
        let seqs: Vec<u64> = (0..600).map(|_| s.append(event(EventKind::DeviceLost)).event.seq).collect();
        let before = rewrites.get();
        for seq in &seqs {
            s.ack(*seq);
        }
        assert!(rewrites.get() - before <= 4, "{} rewrites for {} acks", rewrites.get() - before, seqs.len());
        assert_eq!(s.take_telemetry().len(), 300, "the kept telemetry is intact");
        drop(s);
        let (s, r) = open(dir.path());
        assert_eq!((r.pending_events, s.pending().count()), (0, 0));
    }

    /// A disk that fills up after a number of bytes (and can be emptied again), and counts
    /// rewrites of the whole log.
    struct TestDisk {
        inner: FileStorage,
        room: Rc<Cell<u64>>,
        rewrites: Rc<Cell<u32>>,
    }

    impl TestDisk {
        fn take(&self, n: usize) -> io::Result<()> {
            let n = n as u64;
            if n > self.room.get() {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.room.set(self.room.get() - n);
            Ok(())
        }
    }

    impl Storage for TestDisk {
        fn read_all(&mut self) -> io::Result<Vec<u8>> {
            self.inner.read_all()
        }
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.take(bytes.len())?;
            self.inner.append(bytes)
        }
        fn sync(&mut self) -> io::Result<()> {
            self.inner.sync()
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.inner.truncate(len)
        }
        fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
            // A rewrite needs room for the whole new file next to the old one.
            if (bytes.len() as u64) > self.room.get() {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.rewrites.set(self.rewrites.get() + 1);
            self.inner.replace(bytes)
        }
    }

    #[test]
    fn disk_full_holds_events_in_memory_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let room = Rc::new(Cell::new(10_000));
        let disk = TestDisk {
            inner: FileStorage::open(dir.path()).unwrap(),
            room: room.clone(),
            rewrites: Rc::new(Cell::new(0)),
        };
        let (mut s, _) = Spool::open(disk, 1 << 20, 1).unwrap();
        let a = s.append(event(EventKind::MainsLost)).event.seq;
        room.set(0);
        let b = s.append(event(EventKind::BatteryLow)).clone();
        assert!(!b.durable);
        assert!(s.degraded(), "the family must be warned");
        let c = s.append(event(EventKind::DeviceLost)).event.seq;
        assert_eq!(s.pending().map(|p| p.event.seq).collect::<Vec<_>>(), [a, b.event.seq, c], "nothing lost, in order");
        assert!(!s.retry_held());
        room.set(1 << 20);
        assert!(s.retry_held());
        assert!(!s.degraded());
        drop(s);
        let (s, _) = open(dir.path());
        assert_eq!(
            s.pending().map(|p| p.event.seq).collect::<Vec<_>>(),
            [a, b.event.seq, c],
            "held events reached the disk"
        );
    }
}
