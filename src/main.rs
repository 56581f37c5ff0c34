//! The `tmws` command line: `tmws serve` (default) and `tmws migrate`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tmws::{
    config::{Config, settings_help},
    server, store, telemetry,
};

#[derive(Parser)]
#[command(name = "tmws", version, about = "Trinitas Memory & Workflow Service (gRPC)", after_help = settings_help())]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (default). Applies migrations first unless TMWS_AUTO_MIGRATE=false.
    #[command(after_help = settings_help())]
    Serve,
    /// Create the database if needed and apply pending migrations, then exit.
    #[command(after_help = settings_help())]
    Migrate,
    /// Manage agents directly in the database (bootstrap: the first admin and its key).
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Write agents, API keys, memories, workflows and finished runs as JSON lines (to move from
    /// the embedded store to PostgreSQL). The embedded store must not be in use by a server.
    #[command(after_help = settings_help())]
    Export {
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Read an export into the configured database, in one transaction; rows that already exist
    /// are kept and counted as skipped.
    #[command(after_help = settings_help())]
    Import {
        /// Input file (default: standard input).
        #[arg(long, short)]
        input: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Create an agent and print its first API key (shown once; store it now).
    Create {
        /// Namespace of the agent.
        #[arg(long)]
        namespace: String,
        /// admin, agent or readonly.
        #[arg(long)]
        role: String,
        /// Agent id (1-128 of [A-Za-z0-9._:@-]); a UUIDv7 when omitted.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Print a new API key for an existing agent (e.g. when an admin's key is lost).
    CreateKey {
        /// Agent id.
        #[arg(long)]
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tmws: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tmws: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let _telemetry = telemetry::init(config.log_format)?;
        tracing::debug!(?config, "configuration");
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let shutdown = server::shutdown_signal()?;
                let listener = tokio::net::TcpListener::bind(config.grpc_addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {} (TMWS_GRPC_ADDR): {e}", config.grpc_addr))?;
                server::serve(config, listener, shutdown).await
            }
            Command::Agents(cmd) => {
                let store = store::open_shared(&config, true, config.auto_migrate).await?;
                let key = match cmd {
                    AgentsCommand::Create { namespace, role, id, display_name } => {
                        let (agent, key) =
                            tmws::auth::bootstrap::create_agent(&store, id, &namespace, &role, display_name).await?;
                        eprintln!(
                            "created agent {} (namespace {}, role {})",
                            agent.id,
                            agent.namespace,
                            agent.role.as_str()
                        );
                        key
                    }
                    AgentsCommand::CreateKey { id } => tmws::auth::bootstrap::issue_key(&store, &id).await?,
                };
                store.close().await;
                // The key alone on stdout, so scripts can capture it.
                println!("{key}");
                Ok(())
            }
            Command::Export { output } => {
                let store = store::open(&config, false, config.auto_migrate).await?;
                let mut out: Box<dyn std::io::Write + Send> = match &output {
                    Some(path) => Box::new(std::io::BufWriter::new(create_private(path)?)),
                    None => Box::new(std::io::BufWriter::new(std::io::stdout())),
                };
                let counts = store::transfer::export(&store, &mut *out).await;
                store.close().await;
                let counts = counts?;
                eprintln!("exported {}", summary(&counts.rows));
                if counts.unfinished > 0 {
                    eprintln!(
                        "not exported: {} runs or standalone tasks still in progress (finish or cancel them, then export again)",
                        counts.unfinished
                    );
                }
                Ok(())
            }
            Command::Import { input } => {
                let store = store::open(&config, true, config.auto_migrate).await?;
                let reader: Box<dyn std::io::BufRead + Send> = match &input {
                    Some(path) => Box::new(std::io::BufReader::new(
                        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    )),
                    None => Box::new(std::io::BufReader::new(std::io::stdin())),
                };
                let counts = store::transfer::import(&store, reader).await;
                store.close().await;
                let counts = counts?;
                eprintln!("imported {}", summary(&counts.rows));
                if !counts.skipped.is_empty() {
                    eprintln!("already present (kept): {}", summary(&counts.skipped));
                }
                Ok(())
            }
            Command::Migrate => {
                let store = store::open(&config, true, true).await?;
                store.close().await;
                tracing::info!("migrations applied");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tmws: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `table: n, ...` of the non-empty tables.
fn summary(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts.iter().filter(|(_, n)| **n > 0).map(|(t, n)| format!("{t}: {n}")).collect();
    if parts.is_empty() { "nothing".into() } else { parts.join(", ") }
}

/// Creates `path` readable by its owner only (an export holds API key hashes).
fn create_private(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
