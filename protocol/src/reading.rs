//! The common readings every device codec converts to, with the field names of the MQTT v1
//! contract (`docs/mqtt.md`). Every field is optional: `None` (JSON `null`) means the device
//! did not report it or reported "no value", never zero.

use serde::{Deserialize, Serialize};

/// What a UPS, a power station or a Pi UPS board reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpsReading {
    /// Running from its battery (utility fail).
    pub on_battery: Option<bool>,
    /// The UPS says its battery is low.
    pub battery_low: Option<bool>,
    /// Input (mains) voltage, V.
    pub input_voltage_v: Option<f64>,
    /// Megatec's input *fault* voltage, V: holds a glitch until the next query, so it reveals
    /// an outage shorter than one poll.
    pub input_fault_voltage_v: Option<f64>,
    /// Output voltage, V.
    pub output_voltage_v: Option<f64>,
    /// Load, % of rating.
    pub load_pct: Option<f64>,
    /// Battery voltage, V (per cell on some online Megatec units, total on others).
    pub battery_voltage_v: Option<f64>,
    /// Battery charge, %.
    pub battery_charge_pct: Option<f64>,
    /// Runtime left as the UPS itself estimates it, s.
    pub runtime_s: Option<u32>,
    /// Temperature, °C.
    pub temperature_c: Option<f64>,
    /// Input frequency, Hz.
    pub frequency_hz: Option<f64>,
    /// The UPS reports a fault.
    pub ups_fault: Option<bool>,
    /// The UPS asks for its battery to be replaced.
    pub replace_battery: Option<bool>,
    /// Bypass, boost or buck (AVR) active.
    pub bypass_active: Option<bool>,
    /// A self-test is running.
    pub self_test: Option<bool>,
    /// A shutdown is pending.
    pub shutdown_active: Option<bool>,
    /// The UPS's own beeper is on.
    pub beeper_on: Option<bool>,
}

impl UpsReading {
    /// Overlay every field that `newer` has onto `self` (for protocols that report one value a
    /// reply, such as APC Smart).
    pub fn merge(&mut self, newer: &UpsReading) {
        macro_rules! overlay {
            ($($f:ident),*) => { $( if newer.$f.is_some() { self.$f = newer.$f; } )* };
        }
        overlay!(
            on_battery,
            battery_low,
            input_voltage_v,
            input_fault_voltage_v,
            output_voltage_v,
            load_pct,
            battery_voltage_v,
            battery_charge_pct,
            runtime_s,
            temperature_c,
            frequency_hz,
            ups_fault,
            replace_battery,
            bypass_active,
            self_test,
            shutdown_active,
            beeper_on
        );
    }
}

/// What a pulse oximeter reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OximeterReading {
    /// Functional oxygen saturation, %.
    pub spo2_pct: Option<u8>,
    /// Pulse rate, beats per minute.
    pub pulse_bpm: Option<u16>,
    /// Perfusion index, %.
    pub perfusion_index: Option<f64>,
    /// No sensor, sensor off the patient, or sensor disconnected.
    pub sensor_off: Option<bool>,
    /// Searching for a pulse.
    pub searching: Option<bool>,
    /// Low (or marginal) perfusion.
    pub low_perfusion: Option<bool>,
    /// Motion or other artifact.
    pub artifact: Option<bool>,
    /// The sensor or cable is faulty or unrecognised.
    pub sensor_fault: Option<bool>,
    /// The oximeter's own alarm is sounding.
    pub alarm_active: Option<bool>,
    /// The oximeter's alarm has been silenced (or switched off) at the bedside.
    pub alarm_silenced: Option<bool>,
    /// The oximeter's own battery is low.
    pub low_battery: Option<bool>,
}
