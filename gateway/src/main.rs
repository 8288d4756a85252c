//! `mamori-gateway`: the centre service's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mamori's gateway: decides who must know about a home on backup power, and keeps asking
/// until someone answers. A secondary, remote notification system: it never silences or
/// replaces a device's own alarm.
#[derive(Parser, Debug)]
#[command(name = "mamori-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the self-contained demo (not built yet: prints what exists today).
    Demo,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo => {
            eprintln!("{}", mamori_gateway::DEMO_NOT_BUILT);
            // Not a success: nothing was demonstrated.
            ExitCode::from(3)
        }
    }
}
