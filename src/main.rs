//! The `amslb` command: parse arguments, load the config, run.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

mod fdlimit;

/// mimalloc instead of glibc malloc: the keep-alive profile spent 6-10 % in
/// malloc/free, and glibc's per-thread arenas grew and shrank (mprotect
/// calls) under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load balancer for Ant Media Server clusters.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing
    /// filter such as "amslb=debug"). Default: RUST_LOG, else info.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit 0 if it is valid, 1 if not
    /// (like `haproxy -c` or `nginx -t`).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    // Before anything builds a TLS config (a `tls` listener's own cert, the
    // MongoDB driver, ACME): with two providers compiled in, rustls panics
    // on the first `ServerConfig::builder()` otherwise.
    amslb::tls::install_crypto_provider();
    let Some(path) = cli.config else {
        eprintln!("error: --config FILE is required (see amslb --help)");
        return ExitCode::from(2);
    };
    // The same checks a reload makes, so `check` passing means reload would.
    let loaded = match amslb::reload::prepare(&path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for warning in &loaded.warnings {
        tracing::warn!("{}: {warning}", path.display());
    }
    fdlimit::raise(loaded.config.global.max_connections);
    if let Some(Command::Check) = cli.command {
        println!("{}: configuration is valid", path.display());
        return ExitCode::SUCCESS;
    }
    match serve(path, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: PathBuf, prepared: amslb::reload::Prepared) -> anyhow::Result<()> {
    // One event loop on this thread; amslb starts one more per CPU itself
    // (`[global] workers`, see amslb::workers) so each connection stays on one thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(amslb::run(path, prepared))
        .context("starting amslb")?;
    Ok(())
}

fn init_logging(level: Option<&str>) {
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
