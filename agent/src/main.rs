//! `mamori-agent`: the home service's command line.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mamori_agent::decode::{self, Format};

/// mamori's home agent: watches a ventilated child's backup power, oximeter and ventilator
/// alarm, and tells the people outside. A secondary, remote notification system: it never
/// silences or replaces a device's own alarm.
#[derive(Parser, Debug)]
#[command(name = "mamori-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Decode a capture of a device's output into JSON readings, one per line.
    ///
    /// Reads FILE, or standard input when no FILE is given. Undecodable bytes are reported on
    /// standard error with their byte offset and skipped.
    Decode {
        /// The device protocol of the capture.
        #[arg(long, value_enum)]
        format: Format,
        /// The capture file (standard input when absent).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Decode { format, file } => {
            let input: Box<dyn Read> = match &file {
                Some(path) => match File::open(path) {
                    Ok(f) => Box::new(f),
                    Err(e) => {
                        eprintln!("mamori-agent decode: cannot read {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => Box::new(io::stdin().lock()),
            };
            let mut out = io::stdout().lock();
            let mut err = io::stderr().lock();
            match decode::run(format, input, &mut out, &mut err) {
                Ok(_) => ExitCode::SUCCESS,
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mamori-agent decode: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
