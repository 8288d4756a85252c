//! The gateway's command line as it stands: `demo` says plainly that it is not built.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::process::Command;

#[test]
fn demo_says_it_is_not_built_and_does_not_claim_success() {
    let out = Command::new(env!("CARGO_BIN_EXE_mamori-gateway")).arg("demo").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"));
}

#[test]
fn unknown_verbs_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_mamori-gateway")).arg("fly").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
