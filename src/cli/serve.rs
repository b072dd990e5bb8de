//! `iop-gateway serve`: loads and validates the configuration, then runs the FHIR server until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, Config, Overrides};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML). Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml if it exists, else built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (overrides server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Folder for the embedded SQLite store (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let file = Config::locate(args.config.as_deref(), &env);
    let overrides = Overrides { listen: args.listen, data_dir: args.data_dir };
    let loaded = match Config::load(file.as_deref(), &config::process_env(), &overrides) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("iop-gateway: {e}");
            return ExitCode::from(super::EXIT_USAGE);
        }
    };
    crate::telemetry::init(&loaded.config.log);
    if let Some(file) = &loaded.file {
        tracing::info!(file = %file.display(), "Configuration loaded.");
    } else {
        tracing::info!("No configuration file; using built-in defaults.");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("iop-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let running = crate::server::start(loaded, crate::server::shutdown_signal()).await?;
        running.wait().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iop-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
