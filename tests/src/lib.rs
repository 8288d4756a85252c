//! # mamori-tests
//!
//! The whole chain over real parts, and the benchmarks. It builds on the harness in
//! `mamori-testkit` (re-exported here, so scenarios and benchmarks write `mamori_tests::site`
//! as before) and adds what needs both the agent and the gateway:
//!
//! - [`chain`]: the chain as deployed ([`chain::Chain`]: the generated TLS broker config,
//!   provisioned homes, agent and gateway processes, each home behind a cuttable
//!   `netcut::Link`), run through the failure scenarios in `tests/tests/chain.rs`;
//! - [`fleet`]: what the fleet and reconnection benchmarks share.
//!
//! Scenarios live in `tests/tests/`: `chain.rs` (the whole chain), `mqtt_contract.rs` (the
//! MQTT contract), `security.rs` (provisioning and the broker's lock-down, read with the
//! agent's own config loader) and `bundle.rs` (a provisioned bundle is a config the agent
//! accepts). The crate builds the real programs as `e2e-agent` and `e2e-gateway` (their
//! `main` is the libraries' `cli::main`), since cargo builds only a package's own binaries
//! for its integration tests. Benchmarks are its binaries (`src/bin/bench_*.rs`), run by hand;
//! their figures are in `docs/benchmarks.md`.
#![deny(unsafe_code, missing_docs)]

pub use mamori_testkit::*;

pub mod args;
pub mod chain;
pub mod fleet;
