//! The `amslb` command: parse arguments, load the config, run.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

mod fdlimit;

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
    Check {
        /// Also print what reloading from this (running) config file to the
        /// checked one would change, setting by setting, and which of those
        /// changes need a restart.
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
    },
    /// Translate an HAProxy or nginx config into a commented lb.toml on
    /// stdout; what could not be translated goes to stderr, with why. Exits 0
    /// when the result passes `amslb check`.
    Import {
        /// Which balancer wrote FILE.
        #[arg(value_enum)]
        format: ImportFormat,
        /// The config to translate (e.g. /etc/haproxy/haproxy.cfg, /etc/nginx/nginx.conf).
        file: PathBuf,
    },
    /// Upgrade the running amslb in place without dropping a session: send
    /// it SIGUSR2 (it starts the binary at its path, which takes over every
    /// listener) and wait until the pid file names the new process.
    Upgrade {
        /// The pid file of the running amslb; default: `[global] pid_file`
        /// of `--config`.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
        /// How long to wait for the new process to take over.
        #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    amslb::config::duration::parse(text)
}

/// Config dialects `amslb import` reads.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ImportFormat {
    /// HAProxy (`global`, `defaults`, `frontend`, `backend`, `listen`).
    Haproxy,
    /// nginx (`http {}` upstreams and servers, `stream {}`).
    Nginx,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    // Before anything builds a TLS config (a `tls` listener's own cert, the
    // MongoDB driver, ACME): with two providers compiled in, rustls panics
    // on the first `ServerConfig::builder()` otherwise.
    amslb::tls::install_crypto_provider();
    if let Some(Command::Import { format, file }) = &cli.command {
        return import(*format, file);
    }
    if let Some(Command::Upgrade { pid_file, timeout }) = &cli.command {
        return upgrade(cli.config.as_deref(), pid_file.as_deref(), *timeout);
    }
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
    if let Some(Command::Check { against }) = cli.command {
        println!("{}: configuration is valid", path.display());
        return match against {
            Some(running) => print_changes(&running, &loaded),
            None => ExitCode::SUCCESS,
        };
    }
    match serve(path, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints what a reload from the config at `running` to `new` would change.
fn print_changes(running: &std::path::Path, new: &amslb::reload::Prepared) -> ExitCode {
    let old = match amslb::reload::prepare(running) {
        Ok(old) => old,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let changes = amslb::config::diff::changes(&old.settings, &new.settings);
    if changes.is_empty() {
        println!("a reload from {} would change nothing", running.display());
        return ExitCode::SUCCESS;
    }
    let restart = changes.iter().filter(|c| c.restart.is_some()).count();
    println!(
        "a reload from {} would change {} setting(s), {restart} of them only on restart:",
        running.display(),
        changes.len()
    );
    for change in &changes {
        match change.restart {
            Some(why) => println!("  {}  (needs a restart: {why})", change.key),
            None => println!("  {}", change.key),
        }
    }
    ExitCode::SUCCESS
}

fn import(format: ImportFormat, file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let source = file.display().to_string();
    let imported = match format {
        ImportFormat::Haproxy => amslb::import::haproxy(&text, &source),
        ImportFormat::Nginx => amslb::import::nginx(&text, &source),
    };
    print!("{}", imported.toml);
    for note in &imported.notes {
        eprintln!(
            "{source}:{}: not translated: {}: {}",
            note.line, note.item, note.why
        );
    }
    // What `amslb check` would say about the result (it has no file yet).
    let checked = amslb::config::parse_str(&imported.toml, std::path::Path::new("<imported>"))
        .map_err(|e| e.to_string())
        .and_then(|loaded| match &loaded.config.stats {
            Some(stats) => amslb::stats::auth::Access::from_config(stats)
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        });
    match checked {
        Ok(()) => {
            eprintln!(
                "{source}: imported; the result passes amslb check ({} items not translated)",
                imported.notes.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the imported config does not pass amslb check: {e}");
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

/// `amslb upgrade`: checks the config the new process will load (when
/// given), signals the running process and waits for the pid file to name
/// its successor.
fn upgrade(
    config: Option<&std::path::Path>,
    pid_file: Option<&std::path::Path>,
    timeout: std::time::Duration,
) -> ExitCode {
    let configured = match config {
        Some(path) => match amslb::reload::prepare(path) {
            Ok(prepared) => prepared.config.global.pid_file,
            Err(e) => {
                eprintln!("error: {e}\nthe running amslb was not signalled");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let Some(pid_file) = pid_file.map(PathBuf::from).or(configured) else {
        eprintln!("error: give --pid-file FILE, or --config with [global] pid_file");
        return ExitCode::from(2);
    };
    match amslb::upgrade::signal_upgrade(&pid_file, timeout) {
        Ok((old, new)) => {
            println!(
                "upgraded: process {new} took over from {old}, which finishes its open sessions"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: Option<&str>) {
    let directives = level
        .map(str::to_string)
        .or_else(|| std::env::var(EnvFilter::DEFAULT_ENV).ok())
        .unwrap_or_else(|| "info".to_string());
    let filter = EnvFilter::new(quiet_rustls(directives));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `directives` with rustls held to errors, unless they name rustls
/// themselves. rustls warns about what a client sent, once per handshake (an
/// IP address as SNI, which wrk and many scripts send, is one such warning):
/// any client could fill the log that way, and at a few thousand handshakes
/// a second the formatting and writing cost ~4 % of amslb's CPU. A failed
/// handshake is still logged by amslb itself (`http::serve_tls_connection`, at debug).
fn quiet_rustls(directives: String) -> String {
    if directives.contains("rustls") {
        directives
    } else {
        format!("{directives},rustls=error")
    }
}
