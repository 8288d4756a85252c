//! `mamori-agent`: the command line lives in [`mamori_agent::cli`], so that the end-to-end tests
//! can build the same program under their own name.

fn main() -> std::process::ExitCode {
    mamori_agent::cli::main()
}
