//! What the engine writes into the data of the alerts it raises from its own judgement, typed:
//! the engine writes these with [`to_data`](mamori_protocol::event_data::to_data) and the
//! messages read them with [`read`](mamori_protocol::event_data::read), so a key is spelled
//! once and cannot drift between the two. (The readings a device event carries are the
//! protocol's [`Readings`](mamori_protocol::event_data::Readings), written by the agent.)
//!
//! Every field is optional: an alert stored by an older gateway that lacks one reads it as
//! absent, and the message leaves that part out. (A value of the wrong type makes the whole
//! set read as absent; only the engine writes these.)

use serde::{Deserialize, Serialize};

use crate::domain::homes::BackupKind;

/// `clock_skew`: how far the home unit's clock is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClockSkew {
    /// Seconds the home's clock is ahead (positive) or behind (negative).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skew_s: Option<i64>,
}

/// `battery_degraded`: what the home's outages measured of its battery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatteryDegraded {
    /// The energy the battery gave, as a percentage of its care plan's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_pct: Option<f64>,
    /// The care plan's energy, Wh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_wh: Option<f64>,
    /// The energy it gave, Wh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_wh: Option<f64>,
    /// Which backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<BackupKind>,
    /// How many discharges the measure is drawn from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discharges: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamori_protocol::event_data::{read, to_data};

    #[test]
    fn written_and_read_by_the_same_names() {
        let b = BatteryDegraded {
            health_pct: Some(55.0),
            plan_wh: Some(800.0),
            delivered_wh: Some(440.0),
            source: Some(BackupKind::Ups),
            discharges: Some(2),
        };
        let data = to_data(&b);
        assert_eq!(data["health_pct"], 55.0);
        assert_eq!(read::<BatteryDegraded>(&data), b);
        let c = ClockSkew { skew_s: Some(-3600) };
        assert_eq!(read::<ClockSkew>(&to_data(&c)), c);
        // An older alert without the keys: absent, not an error.
        assert_eq!(read::<BatteryDegraded>(&serde_json::Map::new()), BatteryDegraded::default());
    }
}
