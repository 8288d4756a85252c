//! `mamori-demo`: the self-contained demo (see the library's module doc).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mamori's demo: an embedded broker, 12 simulated homes, a scripted regional outage,
/// escalation and the dashboard, in one process on loopback. Its store is deleted on exit.
#[derive(Parser, Debug)]
#[command(name = "mamori-demo", version)]
struct Cli {
    /// Seconds to run after the story (0: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    linger_s: u64,
    /// Register one more home, `demo-home-01`, for your own agent, with its simulated devices
    /// in this folder (default /tmp/mamori-sim); the demo prints its agent config.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "/tmp/mamori-sim")]
    attach: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// (internal) One simulated home: devices on pseudo-terminals and the agent.
    #[command(hide = true)]
    Home {
        /// The agent config.
        #[arg(long)]
        config: PathBuf,
        /// Where the devices go.
        #[arg(long)]
        dir: PathBuf,
        /// Devices.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
    },
}

fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off"));
    // Colours only on a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging();
    let result = match cli.command {
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(mamori_demo::run(cli.linger_s, cli.attach.as_deref()))),
        Some(Command::Home { config, dir, devices }) => mamori_demo::home(&config, &dir, &devices),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mamori-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}
