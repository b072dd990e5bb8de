//! The `iop-gateway` command: parses arguments and hands over to the library's command line layer.

fn main() -> std::process::ExitCode {
    iop_gateway::cli::run()
}
