//! `mamori-agent`, built by this crate for its end-to-end scenarios.

fn main() -> std::process::ExitCode {
    mamori_agent::cli::main()
}
