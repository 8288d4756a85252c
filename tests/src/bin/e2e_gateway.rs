//! `mamori-gateway`, built by this crate for its end-to-end scenarios.

fn main() -> std::process::ExitCode {
    mamori_gateway::cli::main()
}
