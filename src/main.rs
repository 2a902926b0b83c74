//! The `herd` command: parses arguments, sets up logging, and calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herd::config::{Config, ConfigSource, Overrides};
use herd::control::{self, Request};

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
    /// Show the workers of a running herd, like `pm2 ls`.
    Status {
        #[command(flatten)]
        target: ControlArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rolling reload: re-read the config, replace workers one slot at a time.
    Reload(ControlArgs),
    /// Set the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Stop a running herd gracefully and wait until it has stopped.
    Stop(ControlArgs),
}

#[derive(Args)]
struct ControlArgs {
    /// Config file whose `control` path to use [default: ./config.toml if it exists].
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket path (overrides the config's `control`).
    #[arg(long, value_name = "PATH")]
    control: Option<String>,
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
    /// Dispatch policy: round-robin, sticky or least-conn.
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
    /// Control socket path [default: herd.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT, or PORT for 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
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
            let source = config_source(args.config);
            let settings = match source.load() {
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
            match runtime.block_on(herd::primary::run(source, settings)) {
                Ok(herd::primary::Outcome::Clean) => ExitCode::SUCCESS,
                Ok(herd::primary::Outcome::Forced) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("herd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Commands::Status { target, json } => send(&target, Request::Status, |response| {
            let report = response.status.as_ref().expect("status carries a report");
            if json {
                serde_json::to_string_pretty(report).unwrap_or_default()
            } else {
                control::render_table(report)
            }
        }),
        Commands::Reload(target) => send(&target, Request::Reload, |r| r.message.clone()),
        Commands::Scale { workers, target } => {
            send(&target, Request::Scale { workers }, |r| r.message.clone())
        }
        Commands::Stop(target) => send(&target, Request::Stop, |r| r.message.clone()),
    }
}

/// Sends a control request and prints the answer; exit 0 on success, 1 on a
/// refused or failed operation, 3 when no herd answers.
fn send(
    target: &ControlArgs,
    request: Request,
    render: impl Fn(&control::Response) -> String,
) -> ExitCode {
    let path = match control_path(target) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match control::request(&path, &request) {
        Ok(response) if response.ok => {
            println!("{}", render(&response).trim_end());
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!("herd: {}", response.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("herd: {e}");
            ExitCode::from(3)
        }
    }
}

/// The control socket path: --control, else the config's `control`, else the default.
fn control_path(target: &ControlArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &target.control {
        return Ok(PathBuf::from(path));
    }
    Ok(PathBuf::from(
        Config::load(target.config.as_deref())?.control,
    ))
}

fn config_source(args: ConfigArgs) -> ConfigSource {
    ConfigSource {
        path: args.config,
        overrides: Overrides {
            listen: args.listen,
            workers: args.workers,
            mode: args.mode,
            backlog: args.backlog,
            command: args.command,
            max_unacked: args.max_unacked,
            queue_limit: args.queue_limit,
            control: args.control,
            metrics: args.metrics,
        },
    }
}

fn load(args: ConfigArgs) -> anyhow::Result<herd::config::Settings> {
    Ok(config_source(args).load()?)
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
