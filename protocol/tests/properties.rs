//! Properties every codec must hold:
//! 1. no decoder panics on arbitrary bytes, and every error skips at least one byte;
//! 2. a stream split at any points yields the same items as the whole stream at once;
//! 3. every encoder round-trips through its decoder.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use mamori_protocol::codec::{decode_all, Decoder, Stream, StreamEvent};
use mamori_protocol::{apc, bridge, masimo, megatec, mqtt, nellcor, nonin, nut, voltronic};
use proptest::prelude::*;

/// Feed `bytes` in chunks cut at `cuts` and collect the items.
fn items_split<D: Decoder>(decoder: D, bytes: &[u8], cuts: &[usize]) -> Vec<D::Item> {
    let mut stream = Stream::new(decoder);
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut last = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        stream.push(&bytes[last..p]);
        last = p;
        while let Some(ev) = stream.next_event() {
            if let StreamEvent::Error { error, .. } = &ev {
                assert!(error.skip >= 1);
            }
            out.extend(ev.item());
        }
        assert!(stream.buffered() <= bytes.len());
    }
    out
}

fn items<D: Decoder>(decoder: D, bytes: &[u8]) -> Vec<D::Item> {
    decode_all(decoder, bytes).into_iter().filter_map(StreamEvent::item).collect()
}

/// Valid captures of every format, with noise between frames, built from the spec's samples
/// and the encoders.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut nonin2 = nonin::encode_packet(Some(97), Some(72), 0x02, false);
    nonin2.extend(b"\x00\x13noise");
    nonin2.extend(nonin::encode_packet(None, None, 0x40, false));
    let mut nonin7 = nonin::encode_packet(Some(88), Some(151), 0x20, true);
    nonin7.extend(nonin::encode_packet(Some(90), Some(150), 0x00, true));
    let mut nonin8 = Vec::new();
    for i in 0..5u8 {
        nonin8.extend(nonin::Format8::encode(Some(90 + i), Some(70 + u16::from(i)), 0, 0));
    }
    let mut bridge_bytes = b"noise".to_vec();
    for seq in 0..4 {
        let mut out = [0u8; bridge::MAX_ENCODED];
        let f = bridge::Frame { seq, uptime_ms: seq * 1000, mains_present: Some(seq % 2 == 0), ..Default::default() };
        let n = bridge::encode(&f, &mut out).unwrap();
        bridge_bytes.extend(&out[..n]);
    }
    vec![
        ("megatec", b"(208.4 140.0 208.4 034 59.9 2.05 35.0 00110000\rjunk\r#220.0 000 024.0 50.0\r\x00(226.0 195.0 226.0 014 49.0 27.5 30.0 00001000\r\n".to_vec()),
        ("voltronic", b"(PI00\r(L\r(026.5 02 01 068 255\rxx(B\r(234.9 50.0 229.8 50.0 000.0 000 369.1 356.3 052.7 ---.- 026.5 100000000001\r(ACK\r".to_vec()),
        ("apc", b"SM\r\n08\r\n!10\r\n099.0\r\n0327:\r\n$27.34\r\n%+#".to_vec()),
        ("nut", b"BEGIN LIST VAR ups\nVAR ups ups.status \"OB LB\"\nVAR ups battery.charge \"40\"\nEND LIST VAR ups\nERR DATA-STALE\nVAR ups ups.status \"OL\"\n".to_vec()),
        ("masimo", b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n\xff\xfe\r\nSPO2=---% BPM=--- ALARM=0020 EXC=000021\r\n".to_vec()),
        ("nonin-ascii", b"SPO2=097 HR=072\r\nSPO2=--- HR=---\r\nrubbish\r\n".to_vec()),
        ("nonin-2", nonin2),
        ("nonin-7", nonin7),
        ("nonin-8", nonin8),
        ("nellcor", b"TIME %SPO2 BPM PA Status\r\n12-NOV-97 14:00:05 100 120 50\r\n12-NOV-97 14:00:07 --- --- --- SD\r\n12-NOV-97 14:00:09  86 165 30 SL AS\r\n".to_vec()),
        ("bridge", bridge_bytes),
    ]
}

/// Run `check` with the decoder of `format`, comparing debug renderings of the items.
fn with_decoder(format: &str, bytes: &[u8], cuts: &[usize]) -> (Vec<String>, Vec<String>) {
    fn run<D: Decoder + Clone>(d: D, bytes: &[u8], cuts: &[usize]) -> (Vec<String>, Vec<String>)
    where
        D::Item: std::fmt::Debug,
    {
        let whole = items(d.clone(), bytes).iter().map(|i| format!("{i:?}")).collect();
        let split = items_split(d, bytes, cuts).iter().map(|i| format!("{i:?}")).collect();
        (whole, split)
    }
    match format {
        "megatec" => run(megatec::Decoder, bytes, cuts),
        "voltronic" => run(voltronic::Decoder, bytes, cuts),
        "apc" => run(apc::Decoder, bytes, cuts),
        "nut" => run(nut::ReadingDecoder::default(), bytes, cuts),
        "masimo" => run(masimo::Decoder, bytes, cuts),
        "nonin-ascii" => run(nonin::AsciiDecoder, bytes, cuts),
        "nonin-2" => run(nonin::Format2Decoder::default(), bytes, cuts),
        "nonin-7" => run(nonin::Format7Decoder::default(), bytes, cuts),
        "nonin-8" => run(nonin::Format8Decoder, bytes, cuts),
        "nellcor" => run(nellcor::Decoder, bytes, cuts),
        "bridge" => run(bridge::Decoder, bytes, cuts),
        other => panic!("unknown format {other}"),
    }
}

#[test]
fn corpus_decodes_to_something_in_every_format() {
    for (format, bytes) in corpus() {
        let (whole, _) = with_decoder(format, &bytes, &[]);
        assert!(whole.len() >= 2, "{format}: only {} items", whole.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn no_decoder_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        for (format, _) in corpus() {
            // Both whole and split feeding must terminate without panicking.
            let _ = with_decoder(format, &bytes, &cuts);
        }
    }

    #[test]
    fn split_anywhere_gives_the_same_items(cuts in proptest::collection::vec(any::<usize>(), 1..6), noise in proptest::collection::vec(any::<u8>(), 0..64), at in any::<usize>()) {
        for (format, mut bytes) in corpus() {
            let (whole, split) = with_decoder(format, &bytes, &cuts);
            prop_assert_eq!(&whole, &split, "{}", format);
            // The same holds with random noise spliced in somewhere.
            let p = at % (bytes.len() + 1);
            bytes.splice(p..p, noise.iter().copied());
            let (whole, split) = with_decoder(format, &bytes, &cuts);
            prop_assert_eq!(&whole, &split, "{} with noise", format);
        }
    }

    #[test]
    fn megatec_status_round_trips(v in proptest::array::uniform3(0u32..10000), load in 0u32..1000, freq in 0u32..1000, batt in 0u32..1000, temp in 0u32..1000, bits in any::<u8>(), none_mask in any::<u8>()) {
        let opt = |i: u8, x: f64| (none_mask & (1 << i) == 0).then_some(x);
        let s = megatec::Status {
            input_voltage_v: opt(0, v[0] as f64 / 10.0),
            input_fault_voltage_v: opt(1, v[1] as f64 / 10.0),
            output_voltage_v: opt(2, v[2] as f64 / 10.0),
            load_pct: opt(3, load as f64),
            frequency_hz: opt(4, freq as f64 / 10.0),
            battery_voltage_v: opt(5, if batt < 1000 && batt % 2 == 0 { batt as f64 / 100.0 } else { (batt % 1000) as f64 / 10.0 }),
            temperature_c: opt(6, temp as f64 / 10.0),
            bits: megatec::StatusBits::from_byte(bits),
        };
        let wire = s.encode();
        prop_assert_eq!(wire.len(), 47);
        let got = items(megatec::Decoder, &wire);
        prop_assert_eq!(got.len(), 1);
        let megatec::Reply::Status(back) = &got[0] else { panic!() };
        prop_assert_eq!(back.bits, s.bits);
        prop_assert_eq!(back.input_voltage_v, s.input_voltage_v);
        prop_assert_eq!(back.load_pct, s.load_pct);
        prop_assert_eq!(back.temperature_c, s.temperature_c);
        // Battery voltage prints with two decimals under 10 V, one above: compare at 0.01 V.
        prop_assert_eq!(back.battery_voltage_v.map(|x| (x * 100.0).round() as i32), s.battery_voltage_v.map(|x| (x * 100.0).round() as i32));
    }

    #[test]
    fn bridge_frames_round_trip(seq in any::<u32>(), up in any::<u32>(), bus in any::<u16>(), shunt in any::<i32>(), cur in proptest::option::of(any::<i32>()), pw in proptest::option::of(any::<u32>()), mains in proptest::option::of(any::<bool>()), vent in 0u8..4, flags in any::<u16>(), kind in 0u8..3) {
        let f = bridge::Frame {
            seq,
            uptime_ms: up,
            kind: [bridge::FrameKind::Boot, bridge::FrameKind::Sample, bridge::FrameKind::Heartbeat][kind as usize],
            power: Some(bridge::PowerSample { bus_mv: bus, shunt_uv: shunt, current_ma: cur, power_mw: pw }),
            mains_present: mains,
            ventilator: [None, Some(bridge::ContactState::Normal), Some(bridge::ContactState::Alarm), Some(bridge::ContactState::CableFault)][vent as usize],
            flags,
        };
        let mut out = [0u8; bridge::MAX_ENCODED];
        let n = bridge::encode(&f, &mut out).unwrap();
        prop_assert_eq!(items(bridge::Decoder, &out[..n]), vec![f]);
    }

    #[test]
    fn masimo_round_trips(spo2 in proptest::option::of(0u8..=100), bpm in proptest::option::of(0u16..=400), pi in proptest::option::of(0u32..2000), alarm in 0u32..0x80, exc in 0u32..0x1000) {
        let rec = masimo::Record {
            device_time: Some("11/22/26 01:02:03".into()),
            serial: None,
            spo2_pct: spo2,
            pulse_bpm: bpm,
            perfusion_index: pi.map(|x| x as f64 / 100.0),
            alarm: Some(alarm),
            exception: Some(exc),
        };
        prop_assert_eq!(items(masimo::Decoder, &rec.encode()), vec![rec]);
    }

    #[test]
    fn nonin_packets_round_trip(spo2 in proptest::option::of(0u8..=100), bpm in proptest::option::of(0u16..=300), status in any::<u8>(), f7 in any::<bool>()) {
        let wire = nonin::encode_packet(spo2, bpm, status, f7);
        let packets = if f7 { items(nonin::Format7Decoder::default(), &wire) } else { items(nonin::Format2Decoder::default(), &wire) };
        prop_assert_eq!(packets.len(), 1);
        prop_assert_eq!(packets[0].spo2_pct(), spo2);
        prop_assert_eq!(packets[0].pulse_bpm(), bpm);
        let f8 = nonin::Format8::encode(spo2, bpm, status, 0);
        let got = items(nonin::Format8Decoder, &f8);
        prop_assert_eq!(got.len(), 1);
        prop_assert_eq!((got[0].spo2_pct(), got[0].pulse_bpm()), (spo2, bpm));
    }

    #[test]
    fn nut_quoting_round_trips(ups in "[a-z0-9_-]{1,16}", name in "[a-z.]{1,24}", value in "[ -~]{0,40}") {
        let line = nut::Line::Var { ups, name, value };
        let encoded = line.encode();
        prop_assert_eq!(items(nut::Decoder, encoded.as_bytes()), vec![line]);
    }

    #[test]
    fn mqtt_events_round_trip(seq in 1u64.., kind in 0usize..mqtt::EventKind::ALL.len(), secs in 0i64..4_000_000_000, offset_h in -12i32..=14, id in "[A-Za-z0-9_:.-]{1,64}") {
        let tz = chrono::FixedOffset::east_opt(offset_h * 3600).unwrap();
        let ts = chrono::DateTime::from_timestamp(secs, 0).unwrap().with_timezone(&tz);
        let kind = mqtt::EventKind::ALL[kind];
        let e = mqtt::Event {
            id,
            seq,
            ts,
            kind,
            severity: kind.default_severity(),
            source: None,
            data: Default::default(),
            clock: None,
        };
        prop_assert_eq!(mqtt::decode::<mqtt::Event>(&mqtt::encode(&e)), Ok(e));
    }

    #[test]
    fn mqtt_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = mqtt::decode::<mqtt::Event>(&bytes);
        let _ = mqtt::decode::<mqtt::Telemetry>(&bytes);
        let _ = mqtt::decode::<mqtt::Status>(&bytes);
        let _ = mqtt::decode::<mqtt::Ack>(&bytes);
        let _ = mqtt::Topic::parse(&String::from_utf8_lossy(&bytes));
    }
}
