//! The clustered broker: a NATS cluster's configuration, generated from the deployment's PKI
//! as Mosquitto's is (`mamori-gateway pki nats`).
//!
//! NATS serves MQTT 3.1.1 (QoS 0 and 1, retained messages, wills, persistent sessions) from
//! JetStream, replicated across the cluster, so a home's agent and the gateway may each be
//! connected to any node and a node's death loses no queued message. What NATS does not do,
//! and mamori therefore never relies on: `$share` subscriptions (one gateway is active at a
//! time anyway, see [`crate::service::lease`]), QoS 2, and **the Last Will of a client whose node
//! died** — that node is gone and nobody publishes it. The gateway judges a silent home by
//! the absence of its telemetry, never by a will alone.
//!
//! What is generated, in the PKI folder:
//! - `nats-users.conf` (mode 0600), included by every node: one account with JetStream, the
//!   gateway and each home as a user with a bcrypt password and the same permissions as
//!   Mosquitto's ACL (a home publishes only its own status, telemetry and event subjects and
//!   reads only its own `ack`). It is rewritten at every `homes provision` and `homes revoke`
//!   (with [`crate::admin::pki::Pki`]'s password file), so revocation is a reload away. NATS has no
//!   CRL for MQTT clients: a revoked home is refused by its password, as with Mosquitto
//!   before its restart.
//! - `nats-<node>.conf` (mode 0600: it holds the route password), one per node, beside
//!   `nats-users.conf` (NATS resolves an include against the including file's folder): its name,
//!   the MQTT listener on TLS (its own certificate, `nats-broker.pem`, naming every node's
//!   host, so an agent can check the node it fails over to) requiring a client certificate
//!   from the deployment's CA, the
//!   cluster routes on TLS with their own certificate (`nats-route.pem`, for the nodes' host
//!   names) and a route password (`nats-route-password`, so a home's certificate, from the
//!   same CA, cannot join as a route), JetStream's folder, a loopback monitoring port
//!   (`/healthz`) and NATS's own client port on loopback only.
//!
//! Subjects are MQTT topics with `/` as `.` (`mamori/v1/k-01/event` is `mamori.v1.k-01.event`);
//! home ids contain no `.`, so the mapping is one to one.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use crate::admin::pki::GATEWAY_USER;

/// bcrypt's cost for the NATS password file: its minimum, 4 (about 1.5 ms of one core).
///
/// bcrypt's work factor slows down guessing a password that a person chose; every password
/// here is 24 random bytes ([`crate::admin::pki::random_password`]), which no work factor makes
/// more or less guessable. What the cost does buy is load: every MQTT connection checks one
/// hash, so it is what a fleet reconnecting at once pays per home, and provisioning pays it
/// per home too. At 10 (bcrypt's usual default) that was about 94 ms of one core here:
/// `homes provision` of 19,000 homes took 15 minutes, and a NATS cluster would spend 30
/// minutes of CPU letting them back in after a regional cut (`bench-reconnect`).
pub const BCRYPT_COST: u32 = 4;

/// One NATS node: `name=host[:mqtt_port[:cluster_port[:monitor_port]]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its server name (letters, digits, `-`).
    pub name: String,
    /// The host name or address the homes, the gateway and the other nodes reach it by.
    pub host: String,
    /// MQTT over TLS (8883).
    pub mqtt_port: u16,
    /// Routes between nodes (6222).
    pub cluster_port: u16,
    /// Monitoring on loopback (8222): `/healthz`.
    pub monitor_port: u16,
}

impl FromStr for Node {
    type Err = String;

    fn from_str(s: &str) -> Result<Node, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            format!("`{s}`: a node is name=host[:mqtt_port[:cluster_port[:monitor_port]]], e.g. n1=10.0.0.11")
        })?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("`{name}`: a node's name is letters, digits and `-`"));
        }
        let mut parts = rest.split(':');
        let host = parts.next().unwrap_or_default().to_string();
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '"' || c == '/') {
            return Err(format!("`{rest}`: node {name} needs a host name or IPv4 address"));
        }
        let mut port = |what: &str, default: u16| -> Result<u16, String> {
            match parts.next() {
                None => Ok(default),
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("`{p}`: node {name}'s {what} port is a number from 1 to 65535")),
            }
        };
        let node = Node {
            name: name.to_string(),
            host,
            mqtt_port: port("MQTT", 8883)?,
            cluster_port: port("cluster", 6222)?,
            monitor_port: port("monitoring", 8222)?,
        };
        if parts.next().is_some() {
            return Err(format!("`{s}`: at most three ports (mqtt:cluster:monitor)"));
        }
        Ok(node)
    }
}

/// Check a cluster: distinct names, no port used twice on one host, and an odd number of
/// nodes, three or more (JetStream keeps the sessions by a majority: two nodes cannot lose one).
pub fn check_cluster(nodes: &[Node]) -> Result<(), String> {
    if nodes.len() < 3 || nodes.len().is_multiple_of(2) {
        return Err(format!(
            "{} node(s): a cluster is 3 or 5 nodes (JetStream needs a majority to keep the sessions when one dies)",
            nodes.len()
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for n in nodes {
        if !names.insert(n.name.as_str()) {
            return Err(format!("node name `{}` is given twice", n.name));
        }
        for p in [n.mqtt_port, n.cluster_port, n.monitor_port] {
            if !ports.insert((n.host.as_str(), p)) {
                return Err(format!("port {p} on {} is given twice", n.host));
            }
        }
    }
    Ok(())
}

/// A bcrypt hash of a password as NATS reads it (`$2a$`).
pub fn password_hash(password: &str) -> Result<String, String> {
    bcrypt::hash_with_result(password, BCRYPT_COST)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| format!("bcrypt: {e}"))
}

fn quote(s: &str) -> String {
    // NATS's config strings: double quotes, backslash escapes as in JSON.
    serde_json::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    items.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")
}

/// `nats-users.conf` from the password hashes (`user`, bcrypt hash): the gateway's
/// permissions for the user [`GATEWAY_USER`], a home's for every other. Users are MQTT-only.
pub fn users_conf(users: &[(String, String)]) -> String {
    let mut text = String::from(
        "# mamori: NATS users, generated by mamori-gateway (`homes provision`, `homes revoke`). Do not edit.\n\
         accounts {\n  MAMORI {\n    jetstream: enabled\n    users: [\n",
    );
    for (user, hash) in users {
        let (publish, subscribe) = if user == GATEWAY_USER {
            (
                vec!["mamori.v1.*.ack".to_string()],
                vec![
                    "mamori.v1.*.status".to_string(),
                    "mamori.v1.*.telemetry".to_string(),
                    "mamori.v1.*.event".to_string(),
                ],
            )
        } else {
            (
                ["status", "telemetry", "event"].iter().map(|c| format!("mamori.v1.{user}.{c}")).collect(),
                vec![format!("mamori.v1.{user}.ack")],
            )
        };
        // `$MQTT.sub.>`: NATS 2.9 delivers a QoS 1 subscription through an internal subject
        // the subscriber must be allowed to receive on.
        let mut subscribe = subscribe;
        subscribe.push("$MQTT.sub.>".into());
        let _ = writeln!(
            text,
            "      {{ user: {}, password: {}, allowed_connection_types: [\"MQTT\"], permissions: {{ publish: [{}], subscribe: [{}] }} }}",
            quote(user),
            quote(hash),
            list(&publish),
            list(&subscribe)
        );
    }
    text.push_str("    ]\n  }\n}\n");
    text
}

/// One node's `nats-server` config. `pki`: the PKI folder as the node sees it (certificates,
/// `nats-users.conf`); `store_dir`: JetStream's folder; `bind`: the address the MQTT and
/// cluster listeners bind to.
pub fn node_conf(
    node: &Node,
    nodes: &[Node],
    pki: &Path,
    store_dir: &Path,
    bind: &str,
    route_password: &str,
) -> String {
    let p = |f: &str| quote(&pki.join(f).display().to_string());
    let routes: Vec<String> = nodes
        .iter()
        .filter(|n| n.name != node.name)
        .map(|n| format!("nats-route://route:{route_password}@{}:{}", n.host, n.cluster_port))
        .collect();
    format!(
        "# mamori: NATS node `{name}` of {count}, generated by `mamori-gateway pki nats` (docs/operations.md).\n\
         server_name: {nameq}\n\
         # NATS's own protocol: not used by mamori, loopback only.\n\
         host: \"127.0.0.1\"\n\
         port: -1\n\
         http: \"127.0.0.1:{monitor}\"\n\
         max_payload: 65536\n\
         jetstream {{\n  store_dir: {store}\n}}\n\
         mqtt {{\n  listen: \"{bind}:{mqtt}\"\n  \
           # Sessions, queued and retained messages on three nodes: one can die. (Left to\n  \
           # itself NATS counts the nodes it sees at the first connection, and may choose two.)\n  \
           stream_replicas: 3\n  \
           # A message sent to a connection that died unacknowledged (the gateway's node was\n  \
           # killed) is sent again after this: 30 s unless said, 10 s here.\n  \
           ack_wait: \"10s\"\n  \
           tls {{\n    cert_file: {broker_pem}\n    key_file: {broker_key}\n    ca_file: {ca}\n    verify: true\n    timeout: 5\n  }}\n\
         }}\n\
         cluster {{\n  name: \"mamori\"\n  listen: \"{bind}:{cluster}\"\n  \
           authorization {{ user: \"route\", password: {rpw} }}\n  \
           tls {{\n    cert_file: {route_pem}\n    key_file: {route_key}\n    ca_file: {ca}\n    verify: true\n    timeout: 5\n  }}\n  \
           routes: [{routes}]\n\
         }}\n\
         # NATS reads an include beside this file: keep the two in the same folder.\n\
         include \"nats-users.conf\"\n",
        name = node.name,
        count = nodes.len(),
        nameq = quote(&node.name),
        monitor = node.monitor_port,
        store = quote(&store_dir.join(&node.name).display().to_string()),
        mqtt = node.mqtt_port,
        cluster = node.cluster_port,
        broker_pem = p("nats-broker.pem"),
        broker_key = p("nats-broker.key"),
        ca = p("ca.pem"),
        rpw = quote(route_password),
        route_pem = p("nats-route.pem"),
        route_key = p("nats-route.key"),
        routes = list(&routes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_a_name_a_host_and_optional_ports() {
        let n: Node = "n1=10.0.0.11".parse().unwrap();
        assert_eq!((n.mqtt_port, n.cluster_port, n.monitor_port), (8883, 6222, 8222));
        let n: Node = "n2=127.0.0.1:18832:16222:18222".parse().unwrap();
        assert_eq!((n.host.as_str(), n.mqtt_port, n.cluster_port, n.monitor_port), ("127.0.0.1", 18832, 16222, 18222));
        for bad in ["n1", "=h", "n.1=h", "n1=", "n1=h:0", "n1=h:x", "n1=h:1:2:3:4", "n1=h\"x"] {
            assert!(bad.parse::<Node>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cluster_is_an_odd_number_of_distinct_nodes() {
        let nodes = |specs: &[&str]| specs.iter().map(|s| s.parse::<Node>().unwrap()).collect::<Vec<_>>();
        assert!(check_cluster(&nodes(&["a=h1", "b=h2", "c=h3"])).is_ok());
        assert!(check_cluster(&nodes(&["a=h1", "b=h2"])).unwrap_err().contains("3 or 5"));
        assert!(check_cluster(&nodes(&["a=h1", "b=h2", "c=h3", "d=h4"])).is_err());
        assert!(check_cluster(&nodes(&["a=h1", "a=h2", "c=h3"])).unwrap_err().contains("twice"));
        assert!(check_cluster(&nodes(&["a=h", "b=h", "c=h3"])).unwrap_err().contains("port 8883 on h"));
        assert!(check_cluster(&nodes(&["a=h:1:2:3", "b=h:4:5:6", "c=h:7:8:9"])).is_ok());
    }

    #[test]
    fn each_home_may_speak_only_as_itself_and_the_gateway_reads_all() {
        let text = users_conf(&[
            (GATEWAY_USER.to_string(), "$2a$10$gw".to_string()),
            ("k-01".to_string(), "$2a$10$k1".to_string()),
        ]);
        let k = text.lines().find(|l| l.contains("\"k-01\"")).unwrap();
        assert!(
            k.contains("publish: [\"mamori.v1.k-01.status\", \"mamori.v1.k-01.telemetry\", \"mamori.v1.k-01.event\"]"),
            "{k}"
        );
        assert!(k.contains("subscribe: [\"mamori.v1.k-01.ack\", \"$MQTT.sub.>\"]"), "{k}");
        assert!(!k.contains('*'), "a home has no wildcard: {k}");
        let g = text.lines().find(|l| l.contains(&format!("user: \"{GATEWAY_USER}\""))).unwrap();
        assert!(g.contains("publish: [\"mamori.v1.*.ack\"]") && g.contains("\"mamori.v1.*.event\""), "{g}");
        assert!(text.contains("\"$2a$10$k1\""), "the hash is quoted: {text}");
    }

    #[test]
    fn a_bcrypt_hash_nats_accepts() {
        let h = password_hash("secret").unwrap();
        assert!(h.starts_with("$2a$04$") && h.len() == 60, "{h}");
        assert!(bcrypt::verify("secret", &h).unwrap());
    }
}
