//! What an event's `data` carries, typed: the contract between the agent that writes it and
//! the gateway that reads it, in one place.
//!
//! On the wire `data` stays a JSON object ([`crate::mqtt::Event::data`]): an older or a newer
//! agent may carry more keys or fewer, and a home may send anything. So these types are
//! *read* leniently, each field on its own: a key that is missing, of the wrong type or out of
//! range reads as absent, never as an error and never as a panic, and the rest of the object
//! is still read. They are written with [`to_data`], so the agent's keys are these fields'
//! names and cannot drift from what the gateway reads.
//!
//! - [`Readings`]: the readings a device event carries at the time it happened (a power
//!   event carries the UPS reading, an oximeter event the oximeter's): the agent writes the
//!   [`UpsReading`](crate::reading::UpsReading) or
//!   [`OximeterReading`](crate::reading::OximeterReading) itself, and a test below holds their
//!   field names to these.
//! - [`BatteryTest`]: the outcome of a scheduled battery self-test (`battery_test`).

use alloc::string::String;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Read one field leniently: whatever does not deserialize as `T` is absent.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// Read a typed view of `data` leniently (see the module doc).
pub fn read<T: DeserializeOwned + Default>(data: &Map<String, Value>) -> T {
    // Every field is lenient and defaulted, so only a value that is not an object could fail;
    // `data` is one.
    serde_json::from_value(Value::Object(data.clone())).unwrap_or_default()
}

/// Write a typed value as `data`: its fields by name, absent ones left out.
pub fn to_data<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Map::new(),
    }
}

/// The readings a device event carries: those of the device at the time, as far as the
/// gateway uses them (the messages' "the UPS shows…", the forecast's first runtime).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Readings {
    /// SpO2, %.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub spo2_pct: Option<f64>,
    /// Pulse, beats per minute.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub pulse_bpm: Option<f64>,
    /// The UPS's charge, %.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub battery_charge_pct: Option<f64>,
    /// The UPS's own runtime estimate, s (a number that does not fit is absent).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub runtime_s: Option<u32>,
    /// The UPS's load, %.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub load_pct: Option<f64>,
}

impl Readings {
    /// The readings in `data`.
    pub fn of(data: &Map<String, Value>) -> Readings {
        read(data)
    }
}

/// How a battery self-test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestResult {
    /// The UPS tested its battery and found it good.
    Passed,
    /// The UPS tested its battery and found it failing.
    Failed,
    /// The UPS did not start the test.
    NotStarted,
    /// Still on battery when the test should have been over: an outage came, which says
    /// nothing of the battery.
    EndedOnBattery,
    /// Due, but not run (on battery, a low charge, an alert; `reason` says which).
    Skipped,
}

/// A `battery_test` event's data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatteryTest {
    /// How it ended (absent: a result this version does not know).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub result: Option<TestResult>,
    /// Why it was skipped or refused, in the agent's words.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it ran, s.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// The charge before it, %.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub charge_before_pct: Option<f64>,
    /// The lowest battery voltage seen during it, V.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub voltage_min_v: Option<f64>,
}

impl BatteryTest {
    /// The outcome in `data`.
    pub fn of(data: &Map<String, Value>) -> BatteryTest {
        read(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{OximeterReading, UpsReading};
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_device_readings_field_names_are_the_ones_the_gateway_reads() {
        // The agent writes the reading itself as an event's data; if a field were renamed on
        // one side only, the gateway would silently lose it.
        let ups = UpsReading {
            battery_charge_pct: Some(62.0),
            runtime_s: Some(720),
            load_pct: Some(35.0),
            ..UpsReading::default()
        };
        let r = Readings::of(&to_data(&ups));
        assert_eq!((r.battery_charge_pct, r.runtime_s, r.load_pct), (Some(62.0), Some(720), Some(35.0)));
        let ox = OximeterReading { spo2_pct: Some(85), pulse_bpm: Some(92), ..OximeterReading::default() };
        let r = Readings::of(&to_data(&ox));
        assert_eq!((r.spo2_pct, r.pulse_bpm), (Some(85.0), Some(92.0)));
    }

    #[test]
    fn a_wrong_or_absurd_value_is_absent_and_the_rest_is_read() {
        for bad in [json!(-1), json!(5_000_000_000_u64), json!("12"), json!(1.5), json!(null), json!([1])] {
            let r = Readings::of(&obj(json!({ "runtime_s": bad, "battery_charge_pct": 40 })));
            assert_eq!((r.runtime_s, r.battery_charge_pct), (None, Some(40.0)), "{bad}");
        }
        let t = BatteryTest::of(&obj(json!({ "result": "melted", "seconds": 12 })));
        assert_eq!((t.result, t.seconds), (None, Some(12)));
        assert_eq!(BatteryTest::of(&Map::new()), BatteryTest::default());
    }

    #[test]
    fn a_battery_test_is_written_and_read_back_with_the_wire_names() {
        let t = BatteryTest { result: Some(TestResult::EndedOnBattery), seconds: Some(30), ..BatteryTest::default() };
        let data = to_data(&t);
        assert_eq!(Value::Object(data.clone()), json!({ "result": "ended_on_battery", "seconds": 30 }));
        assert_eq!(BatteryTest::of(&data), t);
    }
}
