//! `mamori-agent`: the home service's command line.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::decode::{self, Format};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

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
    /// Run the agent in the foreground (the systemd service runs this).
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Log as JSON lines (for a log collector).
        #[arg(long)]
        log_json: bool,
    },
    /// Read each configured source once and print what it saw; exits 1 if any failed.
    Probe {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to wait for each device, ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
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
    /// Create simulated devices on pseudo-terminals under DIR and play a scenario.
    ///
    /// Devices are linked as DIR/ups (Megatec), DIR/oximeter (Masimo), DIR/nonin (Nonin #2)
    /// and DIR/bridge (the sensor bridge); DIR/ups-voltronic and DIR/ups-apc on request.
    /// Commands are also read from standard input.
    Simulate {
        /// Where to create the device links.
        #[arg(long)]
        dir: PathBuf,
        /// A built-in scenario (steady, outage, faults, bedside) or a scenario file.
        #[arg(long, default_value = "steady")]
        scenario: String,
        /// Which devices to create (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = crate::simulate::DEVICES.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
        devices: Vec<String>,
    },
}

fn logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("mamori-agent: {e}");
        ExitCode::from(2)
    })
}

async fn until_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
}

/// The command line: parse the arguments, run the command, return its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: the agent's work per poll is microseconds, and a multi-threaded runtime
    // spends more than that waking threads (measured in docs/benchmarks.md). Blocking device
    // loops (I2C, GPIO) run on tokio's blocking pool.
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build();
    match cli.command {
        Command::Run { config, log_json } => {
            logging(log_json);
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Ok(rt) = runtime() else { return ExitCode::FAILURE };
            rt.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(until_signal(cancel.clone()));
                match crate::run::run(config, cancel).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("mamori-agent: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Probe { config, json, timeout_ms } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Ok(rt) = runtime() else { return ExitCode::FAILURE };
            let limit = Duration::from_millis(timeout_ms);
            let (probes, broker) = rt.block_on(async {
                tokio::join!(crate::probe::probe(&config, limit), crate::probe::broker(&config, limit))
            });
            if json {
                let broker = match &broker {
                    Ok(d) => serde_json::json!({ "ok": true, "detail": d }),
                    Err(e) => serde_json::json!({ "ok": false, "detail": e }),
                };
                let out = serde_json::json!({ "sources": probes, "broker": broker });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                print!("{}", crate::probe::table(&probes));
                print!("{}", crate::probe::broker_line(&broker));
            }
            if probes.iter().all(|p| p.ok) && broker.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
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
        Command::Simulate { dir, scenario, devices } => {
            let text = match crate::simulate::builtin(&scenario) {
                Some(t) => t.to_string(),
                None => match std::fs::read_to_string(&scenario) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("mamori-agent simulate: `{scenario}` is neither a built-in scenario (steady, outage, faults, bedside) nor a readable file: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let steps = match crate::simulate::parse_scenario(&text) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mamori-agent simulate: {scenario}: {e}");
                    return ExitCode::from(2);
                }
            };
            let stop = Arc::new(AtomicBool::new(false));
            // The handlers are installed here, before `ready` is printed: a SIGINT or SIGTERM
            // right after it must stop the simulator cleanly, not kill it (a race a test found
            // when the handlers were installed by the waiting thread itself).
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mamori-agent simulate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let installed = rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
            });
            let (mut int, mut term) = match installed {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mamori-agent simulate: cannot handle signals: {e}");
                    return ExitCode::FAILURE;
                }
            };
            {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    rt.block_on(async {
                        tokio::select! {
                            _ = int.recv() => {}
                            _ = term.recv() => {}
                        }
                    });
                    stop.store(true, Ordering::Relaxed);
                });
            }
            match crate::simulate::run(&dir, &devices, steps, stop) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mamori-agent simulate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
