#![no_main]
//! Fuzz the MQTT v1 payload and topic parsers: arbitrary bytes never panic.
use libfuzzer_sys::fuzz_target;
use mamori_protocol::mqtt;

fuzz_target!(|data: &[u8]| {
    let _ = mqtt::decode::<mqtt::Event>(data);
    let _ = mqtt::decode::<mqtt::Telemetry>(data);
    let _ = mqtt::decode::<mqtt::Status>(data);
    let _ = mqtt::decode::<mqtt::Ack>(data);
    if let Ok(s) = core::str::from_utf8(data) {
        let _ = mqtt::Topic::parse(s);
    }
});
