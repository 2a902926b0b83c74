//! The `herd` command: parses arguments, sets up logging, and calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herd::config::{Config, Overrides};

/// A multi-core front for server processes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run workers behind herd (reads ./config.toml unless -c is given).
    Run(RunArgs),
    /// Validate a config file (and flags) and exit 0 if it is usable, 1 if not.
    Check(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file [default: ./config.toml if it exists].
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept connections on (repeatable), e.g. 127.0.0.1:3000, [::1]:0.
    #[arg(short, long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Number of workers (1-1024) or "max" for one per core.
    #[arg(short, long, value_name = "N|max")]
    workers: Option<String>,
    /// Dispatch policy: round-robin or sticky.
    #[arg(short, long)]
    mode: Option<String>,
    /// Kernel accept-queue length per listener.
    #[arg(long, value_name = "N")]
    backlog: Option<i64>,
    /// Unacknowledged hand-offs per worker before it is skipped.
    #[arg(long, value_name = "N")]
    max_unacked: Option<i64>,
    /// Connections that may wait for a worker before new ones are closed.
    #[arg(long, value_name = "N")]
    queue_limit: Option<i64>,
    /// The worker program and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Exit code for a configuration that cannot be used (clap uses 2 for bad flags too).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Check(args) => match load(args) {
            Ok(settings) => {
                println!(
                    "config OK: {} worker(s) of {} on {}, mode {}",
                    settings.workers,
                    settings.program.display(),
                    settings
                        .listen
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    settings.mode.name()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herd: {e}");
                ExitCode::from(1)
            }
        },
        Commands::Run(args) => {
            init_logging(args.log_format);
            let settings = match load(args.config) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("herd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("herd: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(herd::primary::run(settings)) {
                Ok(herd::primary::Outcome::Clean) => ExitCode::SUCCESS,
                Ok(herd::primary::Outcome::Forced) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("herd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

fn load(args: ConfigArgs) -> anyhow::Result<herd::config::Settings> {
    let mut config = Config::load(args.config.as_deref())?;
    config.apply(Overrides {
        listen: args.listen,
        workers: args.workers,
        mode: args.mode,
        backlog: args.backlog,
        command: args.command,
        max_unacked: args.max_unacked,
        queue_limit: args.queue_limit,
    });
    Ok(config.validate()?)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
