//! What an alert is about: a home's own event kind, or something the gateway concluded.
//!
//! One spelling each ([`AlertKind::as_str`]), used in JSON, the store, outbox keys, policies
//! and messages; a name that is neither an event kind nor a gateway kind does not parse, so a
//! typo in a policy or a rule is an error, never an alert kind that silently matches nothing.

use mamori_protocol::mqtt::EventKind;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An alert's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    /// Raised by a home's event of this kind (`mains_lost`, `spo2_low`, ...).
    Event(EventKind),
    /// The home stopped reporting while all was well.
    HomeSilent,
    /// The home stopped reporting while on battery or alarmed: its state is unknown.
    StateUnknown,
    /// A notification could not be delivered.
    DeliveryFailed,
    /// The home's clock is far off.
    ClockSkew,
    /// A drill: every contact is sent a test message.
    Drill,
    /// A battery holds less than it should (learned from outages).
    BatteryDegraded,
    /// A battery self-test failed.
    BatteryTestFailed,
}

impl AlertKind {
    /// The kinds the gateway raises itself.
    pub const GATEWAY: [AlertKind; 7] = [
        AlertKind::HomeSilent,
        AlertKind::StateUnknown,
        AlertKind::DeliveryFailed,
        AlertKind::ClockSkew,
        AlertKind::Drill,
        AlertKind::BatteryDegraded,
        AlertKind::BatteryTestFailed,
    ];

    /// Its one spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Event(k) => k.as_str(),
            AlertKind::HomeSilent => "home_silent",
            AlertKind::StateUnknown => "state_unknown",
            AlertKind::DeliveryFailed => "delivery_failed",
            AlertKind::ClockSkew => "clock_skew",
            AlertKind::Drill => "drill",
            AlertKind::BatteryDegraded => "battery_degraded",
            AlertKind::BatteryTestFailed => "battery_test_failed",
        }
    }

    /// A kind about the home's power (its outage, its battery, its state unknown on battery).
    pub fn is_power(self) -> bool {
        matches!(
            self,
            AlertKind::Event(EventKind::MainsLost) | AlertKind::Event(EventKind::BatteryLow) | AlertKind::StateUnknown
        )
    }

    /// Silence: the home is not heard.
    pub fn is_silence(self) -> bool {
        matches!(self, AlertKind::HomeSilent | AlertKind::StateUnknown)
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlertKind {
    type Err = String;

    fn from_str(s: &str) -> Result<AlertKind, String> {
        if let Some(k) = AlertKind::GATEWAY.into_iter().find(|k| k.as_str() == s) {
            return Ok(k);
        }
        EventKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .map(AlertKind::Event)
            .ok_or_else(|| format!("{s:?} is not an alert kind"))
    }
}

impl From<EventKind> for AlertKind {
    fn from(k: EventKind) -> AlertKind {
        AlertKind::Event(k)
    }
}

impl Serialize for AlertKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AlertKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AlertKind, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        // A kind a newer version wrote is kept as an unknown event kind, not refused: the
        // stored state still loads.
        Ok(s.parse().unwrap_or(AlertKind::Event(EventKind::Unknown)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_spelling_that_parses_back_and_typos_do_not() {
        let all: Vec<AlertKind> =
            EventKind::ALL.iter().copied().map(AlertKind::Event).chain(AlertKind::GATEWAY).collect();
        let mut names: Vec<&str> = all.iter().map(|k| k.as_str()).collect();
        for k in &all {
            assert_eq!(k.as_str().parse::<AlertKind>(), Ok(*k));
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()));
            assert_eq!(serde_json::from_value::<AlertKind>(serde_json::json!(k.as_str())).unwrap(), *k);
        }
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a gateway kind shares an event kind's name");
        assert!("mains_lsot".parse::<AlertKind>().is_err());
        // As a map key (a home's alerts in its stored state).
        let m: std::collections::BTreeMap<AlertKind, u8> = [(AlertKind::StateUnknown, 1)].into();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"state_unknown":1}"#);
        assert_eq!(serde_json::from_str::<std::collections::BTreeMap<AlertKind, u8>>(&text).unwrap(), m);
    }
}
