//! The `herd` command: parses arguments, sets up logging, and calls the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use herd::config::{Config, ConfigSource, KillMode, Overrides};
use herd::control::{self, ControlRequest};

mod run_cmd;
mod upgrade_cmd;

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
    /// Re-execute herd's binary (the one on disk now) in place: the
    /// workers keep running and serving; exit 1 if the new one cannot
    /// take over (herd goes on as it was).
    Upgrade(ControlArgs),
    /// The dry run `herd upgrade` makes of the new binary.
    #[command(name = "__upgrade-probe", hide = true)]
    UpgradeProbe(RunArgs),
    /// Show the workers' log files (`log_dir`): the last lines of each,
    /// tagged `[worker N]`; with --follow, then what they append.
    Logs {
        /// Config file whose `log_dir` to read [default: ./config.toml if it exists].
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Only this slot's files.
        #[arg(long, value_name = "N")]
        slot: Option<usize>,
        /// Lines of each file to show first.
        #[arg(long, value_name = "N", default_value = "20")]
        lines: usize,
        /// Keep printing what is appended (rotated files are followed), until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Send a bounded HTTP load to one address and report throughput,
    /// latency, errors and the spread over workers.
    #[command(after_help = BENCH_HELP)]
    Bench(BenchArgs),
    /// Run a worker under each dispatch mode in turn, drive the same load
    /// against each, and print one side-by-side table.
    #[command(after_help = COMPARE_HELP)]
    Compare(CompareArgs),
}

const BENCH_HELP: &str = "\
Exit status: 0 when the run completed, even if requests failed or the target
was unreachable for every request (the report counts errors by kind); 2 for
bad arguments (a host name, a malformed target or range, a bound out of range),
and nothing is sent then; 1 if the runtime cannot start.

Every run is bounded: --duration at most 10m, --requests at most 100000000.
From 2xx bodies reading `Handled by worker <pid>` (herd's example workers)
answers are counted per worker pid, with max/min ratio and Jain's index.";

const COMPARE_HELP: &str = "\
Scenarios: uniform (keep-alive connections, every worker healthy); connect
(a new connection per request); stalled (a new connection per request, the
worker in slot 0 SIGSTOPped during the load, so requests sent to it time out).

Modes: herd's, and kernel (round-robin dealt by the kernel: --mode
round-robin --rotation kernel). The others run with --rotation handoff.

For each scenario and mode, herd compare starts `herd run -c FILE|/dev/null
--listen ADDR|127.0.0.1:0 --workers N --mode MODE --control PRIVATE
[--ready R] [--stop-signal S] -- COMMAND`, waits until every worker is
ready (at most 30s), runs the load, reads herd's per-slot counts, and stops
that herd (SIGKILL after 20s), so the next run may bind a fixed --listen.
A mode that does not start is a row with a note. The spread comes from the
bodies (`Handled by worker <pid>`) when they name a worker, else from
herd's per-slot counts; with neither, the row has none and says why.

Exit status: 0 when the comparison ran and at least one row was measured;
1 when no row could be measured, or the output files cannot be written;
2 for bad arguments, and nothing is started then.";

#[derive(Args)]
struct CompareArgs {
    /// Modes to compare, in this order (comma-separated) [default: every mode
    /// that can run the worker: all six for herd-protocol workers;
    /// shared,reuseport,kernel with --ready notify or delay:DUR].
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(herd_tooling::compare::MODES))]
    modes: Option<Vec<String>>,
    /// Scenarios to run, in this order (comma-separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "uniform,stalled",
          value_parser = clap::builder::PossibleValuesParser::new(herd_tooling::compare::Scenario::NAMES))]
    scenarios: Vec<String>,
    /// Worker processes in each run (2 or more for the stalled scenario).
    #[arg(short, long, value_name = "N", default_value_t = 2)]
    workers: usize,
    /// Concurrent client tasks of each load (1-10000).
    #[arg(short, long, value_name = "N", default_value_t = 10)]
    connections: usize,
    /// Each run lasts this long, e.g. 3s, 500ms (at most 10m) [default: 3s].
    #[arg(short, long, value_name = "DUR", value_parser = duration_arg, conflicts_with = "requests")]
    duration: Option<std::time::Duration>,
    /// Each run attempts exactly N requests instead (at most 100000000).
    #[arg(short = 'n', long, value_name = "N")]
    requests: Option<u64>,
    /// Per-request timeout [default: a quarter of --duration, at most 1s].
    #[arg(long, value_name = "DUR", value_parser = duration_arg)]
    timeout: Option<std::time::Duration>,
    /// Bind client sockets to this IPv4 range round-robin, e.g.
    /// 127.0.0.2-127.0.0.51 (so sticky mode sees many clients).
    #[arg(long, value_name = "A-B")]
    source_range: Option<String>,
    /// Also write compare.md, compare.csv and compare.svg into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// How the worker says it is ready, passed to every `herd run`.
    #[arg(long, value_name = "herd|notify|tcp|http:/PATH|delay:DUR")]
    ready: Option<String>,
    /// The signal that stops the worker gracefully, passed to every `herd run`.
    #[arg(long, value_name = "SIGNAL")]
    stop_signal: Option<String>,
    /// A fixed address for every run, for servers that need one
    /// [default: 127.0.0.1:0, a free port per run].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A config file every run starts from; compare's own settings (mode,
    /// workers, listen, control socket, metrics port) win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The worker program and its arguments [default: the config file's `command`].
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// http://IP:PORT/path or IP:PORT (path /). Host names are refused, except localhost.
    #[arg(value_name = "TARGET")]
    target: String,
    /// Concurrent client tasks (1-10000).
    #[arg(short, long, value_name = "N", default_value_t = 10)]
    connections: usize,
    /// Run for this long, e.g. 5s, 500ms (at most 10m) [default: 5s].
    #[arg(short, long, value_name = "DUR", value_parser = duration_arg, conflicts_with = "requests")]
    duration: Option<std::time::Duration>,
    /// Attempt exactly N requests in total, spread over the connections (at most 100000000).
    #[arg(short = 'n', long, value_name = "N")]
    requests: Option<u64>,
    /// Open a fresh TCP connection for each request (sends `Connection: close`)
    /// instead of reusing one keep-alive connection per task.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Bind each new client socket to the next address of this IPv4 range,
    /// round-robin, e.g. 127.0.0.2-127.0.0.51 (exercises sticky mode).
    #[arg(long, value_name = "A-B")]
    source_range: Option<String>,
    /// Per-request timeout, connecting included; a request that takes longer is an error.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = duration_arg)]
    timeout: std::time::Duration,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Reports bad arguments; nothing was started (exit 2).
fn bad_arguments(who: &str, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("{who}: {error}");
    ExitCode::from(EXIT_CONFIG)
}

fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    herd::config::parse_duration(text)
}

#[derive(Args)]
struct ControlArgs {
    /// Config file whose `control` path to use [default: ./config.toml if it exists].
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket path (overrides the config's `control`).
    #[arg(long, value_name = "PATH")]
    control: Option<String>,
    /// Give up after waiting this long for herd: to accept the connection,
    /// to read the request, or between the lines of its answer (herd sends
    /// a heartbeat every 2s while a reload or stop goes on), e.g. 500ms.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = positive_duration_arg)]
    timeout: std::time::Duration,
}

fn positive_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    match duration_arg(text)? {
        std::time::Duration::ZERO => Err("must be more than 0".into()),
        duration => Ok(duration),
    }
}

/// `print!` that neither panics nor fails when stdout's reader went away
/// (`herd status | head -1`): the rest of the output is dropped quietly and
/// the command exits as it would have. Any other write error ends the
/// command with exit 1 and a message.
macro_rules! out {
    ($($arg:tt)*) => {
        if let Err(code) = write_stdout(format_args!($($arg)*)) {
            return code;
        }
    };
}

/// [`out!`] with a newline, like `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        out!("{}\n", format_args!($($arg)*))
    };
}

fn write_stdout(text: std::fmt::Arguments<'_>) -> Result<(), ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => {
            eprintln!("herd: cannot write to stdout: {e}");
            Err(ExitCode::FAILURE)
        }
    }
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
    /// Threads that accept and hand off (1-7), or "auto" for one per 8
    /// cores (the `handoff_threads` key).
    #[arg(long, value_name = "N|auto")]
    handoff_threads: Option<String>,
    /// Dispatch policy: round-robin, sticky, least-conn (herd hands each
    /// connection over), shared or reuseport (the kernel chooses).
    #[arg(short, long)]
    mode: Option<String>,
    /// How round-robin deals: kernel (an eBPF program deals over per-slot
    /// sockets), handoff (herd hands each over the worker's channel) or auto
    /// [default: auto: kernel for Node apps and for servers ready by notify,
    /// tcp or http, handoff for the others].
    #[arg(long, value_name = "kernel|handoff|auto")]
    rotation: Option<String>,
    /// What the workers speak: herd, node-cluster (an unmodified Node.js
    /// cluster app), preload (a program that binds its own port: herd's
    /// preload library captures that bind) or auto [default: auto:
    /// node-cluster when the program is node or nodejs].
    #[arg(long, value_name = "herd|node-cluster|preload|auto")]
    protocol: Option<String>,
    /// Who runs a Node cluster app's primary branch: herd (herd is the
    /// primary; the branch does not run) or run (it runs too, in a process
    /// of its own, with `cluster` standing in for herd's workers)
    /// [default: herd].
    #[arg(long, value_name = "herd|run")]
    node_primary: Option<String>,
    /// Kernel accept-queue length per listener.
    #[arg(long, value_name = "N")]
    backlog: Option<i64>,
    /// Unacknowledged hand-offs per worker before it is skipped.
    #[arg(long, value_name = "N")]
    max_unacked: Option<i64>,
    /// Connections that may wait for a worker before new ones are closed.
    #[arg(long, value_name = "N")]
    queue_limit: Option<i64>,
    /// Count a worker ready this long after its start even if it never says
    /// READY (for plain socket-activated servers in the shared/reuseport modes).
    #[arg(long, value_name = "DUR")]
    ready_delay: Option<String>,
    /// The signal that stops a worker gracefully, by its server's convention
    /// (SIGQUIT for nginx, SIGINT for lighttpd); sent when a worker drains.
    #[arg(long, value_name = "SIGNAL")]
    stop_signal: Option<String>,
    /// How a worker says it is ready: herd (READY on its channel, the
    /// default), notify (sd_notify's READY=1 on NOTIFY_SOCKET, e.g.
    /// gunicorn), tcp (a probe of its own socket accepted), http:/PATH (a
    /// GET there answered 2xx) or delay:DUR (counted ready DUR after it starts).
    #[arg(long, value_name = "herd|notify|tcp|http:/PATH|delay:DUR")]
    ready: Option<String>,
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

/// How `herd check` says the connections will be dealt, as `herd run`
/// would deal them here (kernel rotation only where the program loads);
/// refused where `herd run` would refuse to start.
fn dealing_note(settings: &herd::config::Settings) -> Result<&'static str, String> {
    use herd::activation::SocketPlan;
    use herd_protocol::bpf::Dealing;
    let asked = SocketPlan::of(settings);
    Ok(match (asked, asked.available(&settings.ready)?) {
        _ if settings.protocol == herd::config::WorkerProtocol::NodeCluster
            && settings.handoff.kernel_rotation =>
        {
            " (turns dealt by the kernel over one socket per slot, else by hand-off)"
        }
        (SocketPlan::PerSlot(Dealing::Turns), SocketPlan::PerSlot(Dealing::Turns)) => {
            " (turns dealt by the kernel over one socket per slot)"
        }
        (SocketPlan::PerSlot(Dealing::Turns), SocketPlan::HandOff) => {
            " (kernel rotation unavailable here: turns dealt by hand-off)"
        }
        (SocketPlan::PerSlot(Dealing::Turns), _) => {
            " (kernel rotation unavailable here: reuseport's kernel hash instead)"
        }
        _ => "",
    })
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args
        .peek()
        .is_some_and(|a| a == herd::activation::EXEC_WORKER_ARG)
    {
        // herd starting a worker in an OS-scheduled mode: become it.
        let error = herd::activation::exec_worker(args.skip(1));
        eprintln!("herd: cannot start the worker: {error}");
        return ExitCode::from(127);
    }
    let cli = Cli::parse();
    match cli.command {
        Commands::Check(args) => match load(args) {
            Ok(settings) => {
                let listen = if settings.listen.is_empty() {
                    "the addresses the app listens on".to_string()
                } else {
                    let addrs: Vec<String> =
                        settings.listen.iter().map(ToString::to_string).collect();
                    addrs.join(", ")
                };
                // `herd run` refuses to start without cgroups in this mode: so does check.
                let cgroups = herd::cgroup::CgroupTree::probe();
                if let (KillMode::ControlGroup, Err(e)) = (settings.kill_mode, &cgroups) {
                    eprintln!(
                        "herd: `kill_mode` = \"control-group\", but herd cannot give workers cgroups here: {e}"
                    );
                    return ExitCode::from(1);
                }
                let dealing = match dealing_note(&settings) {
                    Ok(note) => note,
                    Err(why) => {
                        eprintln!("herd: {why}");
                        return ExitCode::from(1);
                    }
                };
                outln!(
                    "config OK: {} worker(s) of {} on {listen}, mode {}{}",
                    settings.workers,
                    settings.program.display(),
                    settings.mode.name(),
                    dealing
                );
                let processes = match (settings.kill_mode, cgroups) {
                    (KillMode::ProcessGroup, _) | (KillMode::Auto, Err(_)) => "process group",
                    _ => "cgroup",
                };
                let takes_sockets =
                    herd::activation::SocketPlan::of(&settings).workers_take_sockets();
                let hung = match settings.hang_timeout {
                    Some(timeout) if takes_sockets => format!(
                        "workers accept by themselves, so no hand-off can find one hung; with ready = \"notify\", one silent for {timeout:?} after a WATCHDOG=1 is (hang_timeout); with per-slot sockets a stalled one loses its turns"
                    ),
                    Some(timeout) => format!(
                        "hung once a hand-off waits {timeout:?} unacknowledged (hang_timeout)"
                    ),
                    None => "never found hung (hang_timeout = \"0s\")".to_string(),
                };
                outln!(
                    "readiness: a worker gets connections once ready: {} (ready = {:?}); one not ready within {:?} is killed (ready_timeout)",
                    settings.ready.describe(),
                    settings.ready.name(),
                    settings.ready_timeout
                );
                outln!(
                    "supervision: a worker is killed with its {processes} (kill_mode {}); {hung}",
                    settings.kill_mode.name()
                );
                if let Some(library) = &settings.preload {
                    outln!(
                        "preload: the program's bind() to {listen} (or a wildcard on its port) is captured by {}; its first listen() says READY",
                        library.display()
                    );
                }
                // As `herd run` would start: with its soft limit raised.
                let fds = herd::fd_budget::FdLimit::raise();
                let need = herd::fd_budget::Plan::of(&settings, settings.workers).need();
                if need.total > fds.soft {
                    println!(
                        "warning: this configuration may need {need}, over the open-file limit of {} (RLIMIT_NOFILE)",
                        fds.soft
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herd: {e}");
                ExitCode::from(1)
            }
        },
        Commands::Run(args) => {
            init_logging(args.log_format);
            let code = run_cmd::run(config_source(args.config));
            // herd's output goes out through bounded queues (worker_output):
            // let what is queued reach the reader, but never wait for good
            // on one that stalled.
            herd::worker_output::flush(herd::worker_output::EXIT_FLUSH_TIMEOUT);
            code
        }
        Commands::Status { target, json } => send(&target, ControlRequest::Status, |response| {
            let report = response.status.as_ref().expect("status carries a report");
            if json {
                serde_json::to_string_pretty(report).unwrap_or_default()
            } else {
                control::render_table(report)
            }
        }),
        Commands::Reload(target) => send(&target, ControlRequest::Reload, |r| r.message.clone()),
        Commands::Scale { workers, target } => {
            send(&target, ControlRequest::Scale { workers }, |r| {
                r.message.clone()
            })
        }
        Commands::Stop(target) => send(&target, ControlRequest::Stop, |r| r.message.clone()),
        Commands::Upgrade(target) => match control_path(&target) {
            Ok(path) => upgrade_cmd::upgrade(&path, target.timeout),
            Err(e) => {
                eprintln!("herd: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Commands::UpgradeProbe(args) => upgrade_cmd::probe(config_source(args.config)),
        Commands::Bench(args) => bench(args),
        Commands::Compare(args) => compare(args),
        Commands::Logs {
            config,
            slot,
            lines,
            follow,
        } => logs(config.as_deref(), slot, lines, follow),
    }
}

/// `herd logs`: reads the config's `log_dir` (nothing else of it) and shows the files.
fn logs(
    config: Option<&std::path::Path>,
    slot: Option<usize>,
    lines: usize,
    follow: bool,
) -> ExitCode {
    let dir = match herd::config::Config::load(config) {
        Ok(config) => config.log_dir,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(dir) = dir else {
        eprintln!("herd: the config sets no `log_dir`, so herd writes no log files (its workers' lines go to its stdout and stderr)");
        return ExitCode::from(1);
    };
    let follow = follow.then_some(std::time::Duration::from_millis(200));
    let mut out = std::io::stdout().lock();
    match herd::log_files::show(&dir, slot, lines, follow, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herd logs: {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// `herd bench`: exit 0 when the run completed (failed requests are in the
/// report), 2 for bad arguments, 1 if the runtime cannot start.
fn bench(args: BenchArgs) -> ExitCode {
    use herd_tooling::bench::{self, BenchOptions, Limit, SourceRange, Target};
    let options = (|| {
        Ok::<_, bench::BenchError>(BenchOptions {
            target: Target::parse(&args.target)?,
            connections: args.connections,
            limit: match (args.requests, args.duration) {
                (Some(n), _) => Limit::Requests(n),
                (None, Some(d)) => Limit::Duration(d),
                (None, None) => Limit::Duration(std::time::Duration::from_secs(5)),
            },
            new_connection_per_request: args.new_connection_per_request,
            source_range: args
                .source_range
                .as_deref()
                .map(SourceRange::parse)
                .transpose()?,
            timeout: args.timeout,
        })
    })()
    .and_then(|options| options.validate().map(|()| options));
    let options = match options {
        Ok(options) => options,
        Err(e) => return bad_arguments("herd bench", e),
    };
    // One thread (current_thread runtime): the work per request is a write
    // and a short parse. Measured on a 2-core machine against 2 hello-workers
    // (debug build): ~38k requests/s with both 10 and 50 connections, the
    // bench using ~1 core and the workers the other; more bench threads would
    // only take CPU from the workers under test, which share the machine.
    let runtime = match runtime("herd bench") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(bench::run(options)) {
        Ok(report) if args.json => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&report).expect("report serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            out!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herd bench: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `herd compare`'s arguments as options, the default modes for the worker
/// filled in, checked.
fn compare_options(
    args: &CompareArgs,
) -> Result<herd_tooling::compare::CompareOptions, herd_tooling::compare::CompareError> {
    use herd_tooling::bench::{Limit, SourceRange};
    use herd_tooling::compare::{self, CompareOptions, Scenario};
    let limit = match (args.requests, args.duration) {
        (Some(n), _) => Limit::Requests(n),
        (None, Some(d)) => Limit::Duration(d),
        (None, None) => Limit::Duration(std::time::Duration::from_secs(3)),
    };
    let herd = std::env::current_exe()
        .map_err(|e| compare::CompareError::Options(format!("cannot find the herd binary: {e}")))?;
    let mut options = CompareOptions {
        herd,
        modes: args.modes.clone().unwrap_or_default(),
        scenarios: args
            .scenarios
            .iter()
            .map(|s| Scenario::parse(s))
            .collect::<Result<_, _>>()?,
        workers: args.workers,
        connections: args.connections,
        limit,
        timeout: args.timeout.unwrap_or(compare::default_timeout(limit)),
        source_range: args
            .source_range
            .as_deref()
            .map(SourceRange::parse)
            .transpose()?,
        command: args.command.clone(),
        passed_on: compare::PassedOn {
            ready: args.ready.clone(),
            stop_signal: args.stop_signal.clone(),
            listen: args.listen.clone(),
            config: args.config.clone(),
        },
    };
    if args.modes.is_none() {
        options.modes = options.default_modes()?;
    }
    options.validate()?;
    Ok(options)
}

/// `herd compare`: exit 0 when at least one row was measured, 1 when none
/// was (or the files cannot be written), 2 for bad arguments.
fn compare(args: CompareArgs) -> ExitCode {
    use herd_tooling::compare;
    let options = match compare_options(&args) {
        Ok(options) => options,
        Err(e) => return bad_arguments("herd compare", e),
    };
    let runtime = match runtime("herd compare") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let report = runtime.block_on(compare::run(&options, |row| {
        let outcome = match &row.bench {
            Some(b) => format!("{} requests, {} errors", b.requests, b.errors),
            None => row.note.clone().unwrap_or_default(),
        };
        eprintln!(
            "herd compare: {} / {}: {outcome}",
            row.scenario.name(),
            row.mode
        );
    }));
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("herd compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        outln!("herd compare: {}", report.summary());
        out!("{}", compare::render_table(&report));
    }
    if let Some(dir) = &args.out {
        let invocation = compare::command_line(&std::env::args().collect::<Vec<_>>());
        match compare::write_files(&report, dir, &invocation) {
            Ok(paths) => {
                for path in paths {
                    eprintln!("herd compare: wrote {}", path.display());
                }
            }
            Err(e) => {
                eprintln!("herd compare: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if report.measured_any() {
        ExitCode::SUCCESS
    } else {
        eprintln!("herd compare: no mode could be measured");
        ExitCode::FAILURE
    }
}

/// Sends a control request and prints the answer; exit 0 on success, 1 on a
/// refused or failed operation, 3 when no herd answers.
fn send(
    target: &ControlArgs,
    request: ControlRequest,
    render: impl Fn(&control::Response) -> String,
) -> ExitCode {
    let path = match control_path(target) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match control::request_within(&path, &request, target.timeout) {
        Ok(response) if response.ok => {
            outln!("{}", render(&response).trim_end());
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
    Ok(Config::control_of(target.config.as_deref())?)
}

fn config_source(args: ConfigArgs) -> ConfigSource {
    ConfigSource {
        path: args.config,
        overrides: Overrides {
            listen: args.listen,
            workers: args.workers,
            handoff_threads: args.handoff_threads,
            mode: args.mode,
            rotation: args.rotation,
            protocol: args.protocol,
            backlog: args.backlog,
            command: args.command,
            max_unacked: args.max_unacked,
            queue_limit: args.queue_limit,
            ready_delay: args.ready_delay,
            stop_signal: args.stop_signal,
            ready: args.ready,
            control: args.control,
            metrics: args.metrics,
            node_primary: args.node_primary,
        },
    }
}

fn load(args: ConfigArgs) -> anyhow::Result<herd::config::Settings> {
    Ok(config_source(args).load()?)
}

/// The single-threaded tokio runtime herd's commands run on.
fn runtime(who: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{who}: cannot start runtime: {e}");
            ExitCode::FAILURE
        })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Never blocks: a stderr that cannot keep up drops lines, counted.
        .with_writer(herd::worker_output::LogWriter)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
