//! Reading, validation and resolution, key by key: every refusal names the
//! key, the value and why, and a refusal from the file says where.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// Settings from `text`, or the refusal (a file's without its position).
fn load(text: &str) -> Result<Settings, String> {
    let config = Config::parse(text).map_err(|e| e.message)?;
    let valid = config.validate().map_err(|e| e.to_string())?;
    resolve(valid).map_err(|e| e.to_string())
}

/// A minimal usable file (`listen` and `command`, unless `extra` sets
/// them) with `extra` after it.
pub(super) fn with(extra: &str) -> Result<Settings, String> {
    let sets = |key: &str| extra.lines().any(|l| l.starts_with(&format!("{key} =")));
    let mut text = String::new();
    if !sets("listen") {
        text.push_str("listen = [\"127.0.0.1:0\"]\n");
    }
    if !sets("command") {
        text.push_str("command = [\"true\"]\n");
    }
    load(&(text + extra))
}

fn refused(extra: &str) -> String {
    with(extra).unwrap_err()
}

#[test]
fn the_repository_config_parses() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.toml")).unwrap();
    let config = Config::parse(&text).unwrap();
    assert_eq!(config.workers, WorkerCount::Max);
    assert_eq!(config.listen, ["127.0.0.1:3000".parse().unwrap()]);
}

#[test]
fn defaults_fill_what_is_not_written() {
    let settings = with("").unwrap();
    assert_eq!(settings.workers, available_cores());
    assert_eq!(settings.mode, Mode::RoundRobin);
    assert_eq!(settings.backlog, 511);
    assert_eq!(settings.handoff.max_unacked, 64);
    assert_eq!(settings.restart.backoff_base, Duration::from_millis(100));
    assert_eq!(settings.control, Path::new(DEFAULT_CONTROL_PATH));
    assert!(settings.program.ends_with("true"));
    // Nothing written is the defaults.
    assert_eq!(
        format!("{:?}", Config::parse("").unwrap()),
        format!("{:?}", Config::default())
    );
}

#[test]
fn kernel_rotation_is_round_robins_and_auto_picks_it_where_hand_offs_cannot_go() {
    let kernel = |extra: &str| with(extra).unwrap().handoff.kernel_rotation;
    // herd-protocol workers keep the hand-off unless asked.
    assert!(!kernel(""));
    assert!(kernel("rotation = \"kernel\"\n"));
    // Node workers and servers ready by sd_notify get the kernel by default.
    assert!(kernel("protocol = \"node-cluster\"\n"));
    assert!(kernel("ready = \"notify\"\n"));
    // A delay says nothing of what the worker takes: the hand-off stays.
    assert!(!kernel("ready = \"delay:1s\"\n"));
    assert!(kernel("ready = \"delay:1s\"\nrotation = \"kernel\"\n"));
    // Only round-robin rotates; the other modes deal their own way.
    assert!(!kernel("protocol = \"node-cluster\"\nmode = \"sticky\"\n"));
    assert!(!kernel("ready = \"notify\"\nmode = \"shared\"\n"));
    assert!(!kernel(
        "protocol = \"node-cluster\"\nrotation = \"handoff\"\n"
    ));
    assert_eq!(
        refused("rotation = \"sideways\"\n"),
        "invalid `rotation` = \"sideways\": expected one of: auto, kernel, handoff"
    );
    for mode in ["sticky", "least-conn", "shared", "reuseport"] {
        assert_eq!(
            refused(&format!("rotation = \"kernel\"\nmode = \"{mode}\"\n")),
            format!("invalid `rotation` = \"kernel\": kernel rotation is round-robin's; mode \"{mode}\" has its own way of dealing")
        );
    }
}

#[test]
fn node_is_found_behind_env_and_in_a_shebang() {
    let words = |line: &str| -> Vec<String> { line.split(' ').map(str::to_string).collect() };
    for (command, node) in [
        ("node app.js", true),
        ("/usr/local/bin/nodejs app.js", true),
        ("/usr/bin/env node app.js", true),
        (
            "env -S NODE_ENV=production node --max-old-space-size=512 app.js",
            true,
        ),
        ("env python3 app.py", false),
        ("nodemon app.js", false),
        ("env", false),
    ] {
        assert_eq!(names_node(&words(command)), node, "{command}");
    }
    // A script run by node through its `#!` line is a Node app too.
    let dir = std::env::temp_dir().join(format!("herd-shebang-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("app");
    std::fs::write(&script, "#!/usr/bin/env node\nconsole.log(1)\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!("command = [{:?}]\n", script.display().to_string());
    assert_eq!(with(&config).unwrap().protocol, WorkerProtocol::NodeCluster);
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    assert_eq!(with(&config).unwrap().protocol, WorkerProtocol::Herd);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_package_runner_is_refused_naming_the_start_script() {
    let dir = std::env::temp_dir().join(format!("herd-npm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("package.json"),
        r#"{"name": "app", "scripts": {"start": "node server.js"}}"#,
    )
    .unwrap();
    let cwd = format!("cwd = {:?}\n", dir.display().to_string());
    let npm = refused(&format!("{cwd}command = [\"npm\", \"start\"]\n"));
    assert!(
        npm.starts_with(
            "invalid `command` = [\"npm\", \"start\"]: npm would start your app as a child"
        ),
        "{npm}"
    );
    assert!(
        npm.contains("package.json's start script is `node server.js`: give that as the command, e.g. command = [\"node\", \"server.js\"]"),
        "{npm}"
    );
    // Without a package.json, the advice is general.
    std::fs::remove_file(dir.join("package.json")).unwrap();
    for runner in ["npx", "yarn", "/usr/local/bin/pnpm"] {
        let why = refused(&format!("{cwd}command = [{runner:?}, \"start\"]\n"));
        assert!(why.contains("run the app directly"), "{why}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_protocol_flag_is_read_as_the_key_is() {
    let mut config = Config::default();
    config
        .apply(Overrides {
            protocol: Some("node-cluster".into()),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(config.protocol, ProtocolChoice::NodeCluster);
    let refused = Config::default()
        .apply(Overrides {
            protocol: Some("grpc".into()),
            ..Overrides::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        refused.starts_with("invalid `protocol` = \"grpc\": expected one of"),
        "{refused}"
    );
}

#[test]
fn the_worker_protocol_is_detected_or_named() {
    assert_eq!(with("").unwrap().protocol, WorkerProtocol::Herd);
    if which_node().is_some() {
        let node = "command = [\"node\", \"app.js\"]\n";
        assert_eq!(with(node).unwrap().protocol, WorkerProtocol::NodeCluster);
        let shared = with(&format!("{node}mode = \"shared\"\n")).unwrap();
        assert_eq!(shared.mode, Mode::Shared);
        assert!(refused(&format!("{node}mode = \"reuseport\"\n"))
            .starts_with("invalid `mode` = \"reuseport\": Node cluster"));
    }
    let node = "protocol = \"node-cluster\"\n";
    assert_eq!(with(node).unwrap().protocol, WorkerProtocol::NodeCluster);
    // Node apps say what they listen on; herd workers must be told.
    assert!(with(&format!("listen = []\n{node}"))
        .unwrap()
        .listen
        .is_empty());
    assert!(refused("listen = []\nprotocol = \"herd\"\n")
        .starts_with("invalid `listen` = []: no address"));
    assert_eq!(
        refused("protocol = \"grpc\"\n"),
        "invalid `protocol` = \"grpc\": expected one of: auto, herd, node-cluster, preload"
    );
    // A port-binding program must still be told what herd serves.
    assert!(refused("listen = []\nprotocol = \"preload\"\n")
        .starts_with("invalid `listen` = []: no address"));
}

fn which_node() -> Option<PathBuf> {
    resolve_program("node", None, &herds_identity()).ok()
}

#[test]
fn unknown_keys_are_refused_by_name_and_place() {
    let error = Config::parse("workers = 2\nwrokers = 4\n").unwrap_err();
    assert!(error.message.contains("unknown field `wrokers`"), "{error}");
    assert_eq!(error.position, Some((2, 1)));
    let error = Config::parse("[handoff]\nmax_unaked = 4\n").unwrap_err();
    assert!(error.message.contains("max_unaked"), "{error}");
    let error = Config::parse("backlog = 1\nbacklog = 2\n").unwrap_err();
    assert_eq!(error.message, "duplicate key `backlog`");
    let error = Config::parse("handoff = 5\n").unwrap_err();
    assert!(
        error.message.ends_with("expected the `[handoff]` table"),
        "{error}"
    );
}

#[test]
fn a_refusal_from_the_file_says_where_it_is() {
    let error = Config::parse("workers = 4\n[handoff]\nmax_unacked = 0\n").unwrap_err();
    assert_eq!(
        error,
        ParseError {
            message: "invalid `handoff.max_unacked` = 0: must be between 1 and 4096".into(),
            position: Some((3, 15)),
        }
    );
    assert_eq!(
        error.to_string(),
        "invalid `handoff.max_unacked` = 0: must be between 1 and 4096 (line 3, column 15)"
    );
    let error = ConfigError::Parse {
        path: "herd.toml".into(),
        error,
    };
    assert_eq!(
        error.to_string(),
        "invalid `handoff.max_unacked` = 0: must be between 1 and 4096 (config file herd.toml, line 3, column 15)"
    );
    // Not TOML at all: where TOML stopped.
    let error = Config::parse("listen = [\"127.0.0.1:0\"\n").unwrap_err();
    assert!(error.position.is_some(), "{error}");
}

#[test]
fn wrong_types_are_refused_by_the_key() {
    for (text, message) in [
        (
            "backlog = \"lots\"",
            "invalid `backlog` = \"lots\": expected a number from 1 to 65535",
        ),
        (
            "mode = 3",
            "invalid `mode` = 3: expected one of: round-robin, sticky, least-conn, shared, reuseport",
        ),
        (
            "max_memory = 512",
            "invalid `max_memory` = 512: expected a size in quotes, e.g. \"64KiB\", \"512MiB\", \"1G\"",
        ),
        (
            "ready_timeout = 30",
            "invalid `ready_timeout` = 30: expected a duration in quotes, e.g. \"500ms\", \"10s\", \"2m\"",
        ),
        (
            "listen = \"127.0.0.1:0\"",
            "invalid `listen` = \"127.0.0.1:0\": expected a list of addresses, e.g. [\"127.0.0.1:3000\"]",
        ),
        (
            "command = [\"true\", 1]",
            "invalid `command` = 1: expected a list: the program and its arguments, e.g. [\"./server\", \"--port\", \"0\"]",
        ),
        ("env = { A = 1 }", "invalid `env.A` = 1: expected a string"),
        (
            "workers = true",
            "invalid `workers` = true: expected a number from 1 to 1024 or \"max\"",
        ),
    ] {
        assert_eq!(Config::parse(text).unwrap_err().message, message);
    }
}

#[test]
fn bad_values_name_key_value_and_reason() {
    assert_eq!(
        refused("workers = 0\n"),
        "invalid `workers` = 0: must be between 1 and 1024"
    );
    assert!(refused("workers = \"many\"\n").starts_with("invalid `workers` = \"many\""));
    assert!(refused("listen = [\"localhost:80\"]\n")
        .starts_with("invalid `listen` = \"localhost:80\": expected IP:PORT"));
    assert_eq!(
        refused("mode = \"fastest\"\n"),
        "invalid `mode` = \"fastest\": expected one of: round-robin, sticky, least-conn, shared, reuseport"
    );
    assert!(refused("[handoff]\nack_timeout = \"10\"\n")
        .starts_with("invalid `handoff.ack_timeout` = \"10\": missing unit"));
    assert_eq!(
        refused("[restart]\nbackoff_base = \"2s\"\nbackoff_max = \"1s\"\n"),
        "invalid `restart.backoff_max` = \"1s\": must not be less than restart.backoff_base (2s)"
    );
}

#[test]
fn worker_program_must_exist_and_be_executable() {
    let command = |program: &str| refused(&format!("command = [{program:?}]\n"));
    assert_eq!(
        command("no-such-herd-worker"),
        "invalid `command` = \"no-such-herd-worker\": not found in PATH"
    );
    let plain = std::env::temp_dir().join(format!("herd-config-test-{}", std::process::id()));
    std::fs::write(&plain, "not a program").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = command(&plain.display().to_string());
    std::fs::remove_file(&plain).unwrap();
    assert!(
        error.ends_with("is not executable (mode 0644, owner uid 0 gid 0)")
            || !nix::unistd::geteuid().is_root(),
        "{error}"
    );
    assert!(error.contains("is not executable"), "{error}");
    assert!(command(&std::env::temp_dir().display().to_string()).ends_with("is not a file"));
    assert!(refused("command = []\n").starts_with("invalid `command` = []: no worker program"));
}

#[test]
fn overrides_replace_file_values() {
    let mut config = Config::parse("listen = [\"127.0.0.1:0\"]\ncommand = [\"true\"]\n").unwrap();
    config
        .apply(Overrides {
            listen: vec!["[::1]:0".into()],
            workers: Some("3".into()),
            mode: Some("sticky".into()),
            command: vec!["sh".into(), "-c".into(), "exit".into()],
            ..Overrides::default()
        })
        .unwrap();
    let settings = resolve(config.validate().unwrap()).unwrap();
    assert_eq!(settings.listen, ["[::1]:0".parse().unwrap()]);
    assert_eq!(settings.workers, 3);
    assert_eq!(settings.mode, Mode::Sticky);
    assert_eq!(settings.args, ["-c", "exit"]);
}

#[test]
fn overrides_are_refused_in_the_words_of_their_key() {
    let refused =
        |overrides: Overrides| Config::default().apply(overrides).unwrap_err().to_string();
    assert_eq!(
        refused(Overrides {
            workers: Some("0".into()),
            ..Overrides::default()
        }),
        "invalid `workers` = 0: must be between 1 and 1024"
    );
    assert_eq!(
        refused(Overrides {
            workers: Some("lots".into()),
            ..Overrides::default()
        }),
        "invalid `workers` = \"lots\": expected a number from 1 to 1024 or \"max\""
    );
    assert!(refused(Overrides {
        listen: vec!["localhost:99999".into()],
        ..Overrides::default()
    })
    .starts_with("invalid `listen` = \"localhost:99999\": expected IP:PORT"));
    assert_eq!(
        refused(Overrides {
            max_unacked: Some(0),
            ..Overrides::default()
        }),
        "invalid `handoff.max_unacked` = 0: must be between 1 and 4096"
    );
    assert!(refused(Overrides {
        ready_delay: Some("soon".into()),
        ..Overrides::default()
    })
    .starts_with("invalid `ready_delay` = \"soon\""));
}

#[test]
fn control_commands_read_the_control_key_alone() {
    let dir = std::env::temp_dir().join(format!("herd-control-of-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herd.toml");
    std::fs::write(&file, "workers = 0\ncontrol = \"there.sock\"\n").unwrap();
    assert_eq!(
        Config::control_of(Some(&file)).unwrap(),
        Path::new("there.sock")
    );
    std::fs::write(&file, "workers = 0\n").unwrap();
    assert_eq!(
        Config::control_of(Some(&file)).unwrap(),
        Path::new(DEFAULT_CONTROL_PATH)
    );
    std::fs::write(&file, "control = \"\"\n").unwrap();
    let error = Config::control_of(Some(&file)).unwrap_err().to_string();
    assert!(
        error.starts_with("invalid `control` = \"\": empty"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn metrics_address_defaults_to_loopback() {
    let metrics = |extra: &str| with(extra).map(|s| s.metrics);
    assert_eq!(metrics(""), Ok(None));
    assert_eq!(
        metrics("[metrics]\naddress = \"9464\"\n"),
        Ok(Some("127.0.0.1:9464".parse().unwrap()))
    );
    assert_eq!(
        metrics("[metrics]\naddress = \"[::1]:9000\"\n"),
        Ok(Some("[::1]:9000".parse().unwrap()))
    );
    assert!(refused("[metrics]\naddress = \"everywhere\"\n")
        .starts_with("invalid `metrics.address` = \"everywhere\""));
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("lots").is_err());
    assert!(parse_size("0").is_err());
    assert_eq!(
        with("max_memory = \"64KiB\"\n").unwrap().max_memory,
        Some(64 << 10)
    );
}

#[test]
fn users_and_groups_resolve_or_are_refused() {
    let root = with("user = \"root\"\n").unwrap().run_as.unwrap();
    assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
    assert!(root.groups.contains(&0), "{root:?}");
    assert_eq!(
        refused("user = \"no-such-user-herd\"\n"),
        "invalid `user` = \"no-such-user-herd\": no such user on this host"
    );
    assert!(refused("group = \"root\"\n").starts_with("invalid `group`"));
}

#[test]
fn hang_timeout_defaults_to_30s_and_0s_turns_it_off() {
    let hang = |extra: &str| with(extra).unwrap().hang_timeout;
    assert_eq!(hang(""), Some(Duration::from_secs(30)));
    assert_eq!(hang("hang_timeout = \"0s\"\n"), None);
    assert!(refused("hang_timeout = \"soon\"\n").starts_with("invalid `hang_timeout` = \"soon\""));
}

#[test]
fn kill_mode_is_one_of_three_or_named() {
    let kill_mode = |extra: &str| with(extra).unwrap().kill_mode;
    assert_eq!(kill_mode(""), KillMode::Auto);
    assert_eq!(
        kill_mode("kill_mode = \"process-group\"\n"),
        KillMode::ProcessGroup
    );
    assert_eq!(
        kill_mode("kill_mode = \"control-group\"\n"),
        KillMode::ControlGroup
    );
    assert_eq!(
        refused("kill_mode = \"process\"\n"),
        "invalid `kill_mode` = \"process\": expected one of: auto, control-group, process-group"
    );
}

#[test]
fn stop_signal_is_a_catchable_signal_with_or_without_its_prefix() {
    use nix::sys::signal::Signal;
    let stop_signal = |extra: &str| with(extra).unwrap().stop_signal;
    assert_eq!(stop_signal(""), None);
    for (written, signal) in [
        ("SIGTERM", Signal::SIGTERM),
        ("SIGQUIT", Signal::SIGQUIT),
        ("QUIT", Signal::SIGQUIT),
        ("sigint", Signal::SIGINT),
        ("INT", Signal::SIGINT),
        ("SIGHUP", Signal::SIGHUP),
        ("USR1", Signal::SIGUSR1),
        ("SIGUSR2", Signal::SIGUSR2),
        ("WINCH", Signal::SIGWINCH),
    ] {
        let extra = format!("stop_signal = {written:?}\n");
        assert_eq!(stop_signal(&extra), Some(signal), "{written}");
    }
    assert_eq!(
        refused("stop_signal = \"SIGKILL\"\n"),
        "invalid `stop_signal` = \"SIGKILL\": SIGKILL cannot be caught, so no server can stop \
         gracefully on it; herd sends it itself after `shutdown_timeout`"
    );
    assert!(refused("stop_signal = \"KILL\"\n")
        .starts_with("invalid `stop_signal` = \"KILL\": SIGKILL"));
    assert!(refused("stop_signal = \"SIGSTOP\"\n")
        .starts_with("invalid `stop_signal` = \"SIGSTOP\": SIGSTOP cannot be caught"));
    assert_eq!(
        refused("stop_signal = \"SIGTERMINATE\"\n"),
        "invalid `stop_signal` = \"SIGTERMINATE\": expected one of: SIGTERM, SIGQUIT, SIGINT, \
         SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH (the SIG prefix may be left out)"
    );
    assert!(refused("stop_signal = 3\n").starts_with("invalid `stop_signal` = 3: expected one of"));
    // The flag reads through the same reader.
    let mut config = Config::parse("").unwrap();
    let flag = |signal: &str| Overrides {
        stop_signal: Some(signal.into()),
        ..Overrides::default()
    };
    config.apply(flag("QUIT")).unwrap();
    assert_eq!(
        config.stop_signal.map(StopSignal::get),
        Some(Signal::SIGQUIT)
    );
    assert!(config
        .apply(flag("SIGSTOP"))
        .unwrap_err()
        .to_string()
        .starts_with("invalid `stop_signal` = \"SIGSTOP\": SIGSTOP cannot be caught"));
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("s").is_err());
    // A refusal quotes a duration as written.
    let written: ConfigDuration = "2m".parse().unwrap();
    assert_eq!(
        (written.get(), written.to_string()),
        (Duration::from_secs(120), "2m".into())
    );
}

#[test]
fn values_run_would_crash_or_spin_on_are_refused() {
    assert!(refused("monitor_interval = \"0s\"\n")
        .starts_with("invalid `monitor_interval` = \"0s\": must be at least 10ms"));
    assert!(
        refused("monitor_interval = \"0.0000000001s\"\n").starts_with("invalid `monitor_interval`")
    );
    assert!(with("monitor_interval = \"10ms\"\n").is_ok());
    assert!(refused("ready_timeout = \"0s\"\n")
        .starts_with("invalid `ready_timeout` = \"0s\": must be more than 0s"));
    assert!(refused("ready_timeout = \"2s\"\nready_delay = \"2s\"\n")
        .starts_with("invalid `ready_delay` = \"2s\": must be shorter than `ready_timeout` (2s)"));
    assert!(with("ready_delay = \"200ms\"\n").is_ok());
    assert!(refused("[restart]\nbackoff_base = \"0ms\"\n")
        .starts_with("invalid `restart.backoff_base` = \"0ms\": must be more than 0s"));
    assert!(refused("[env]\nA = \"x\\u0000y\"\n")
        .starts_with("invalid `env.A` = \"x\\0y\": contains a NUL byte"));
    assert!(refused("env = { \"A=B\" = \"c\" }\n")
        .starts_with("invalid `env` = \"A=B\": not a valid environment variable name"));
    assert!(refused("command = [\"true\", \"a\\u0000b\"]\n")
        .ends_with("argument 1 contains a NUL byte"));
    assert!(refused("cwd = \"/tm\\u0000p\"\n").ends_with("contains a NUL byte"));
}

#[test]
fn the_control_path_must_fit_sun_path() {
    let control = |path: &str| with(&format!("control = {path:?}\n"));
    let fits = "s".repeat(MAX_CONTROL_PATH_LEN);
    assert!(control(&fits).is_ok());
    let long = "s".repeat(MAX_CONTROL_PATH_LEN + 1);
    let error = control(&long).unwrap_err();
    assert!(
        error.starts_with(&format!(
            "invalid `control` = {long:?}: 108 bytes long; a Unix socket path holds at most 107"
        )),
        "{error}"
    );
    assert!(control("")
        .unwrap_err()
        .starts_with("invalid `control` = \"\": empty"));
}

#[test]
fn listeners_that_cannot_all_be_bound_are_refused() {
    let listen = |addrs: &[&str]| {
        let addrs: Vec<String> = addrs.iter().map(|a| format!("{a:?}")).collect();
        with(&format!("listen = [{}]\n", addrs.join(", ")))
    };
    assert!(
        listen(&["127.0.0.1:0", "127.0.0.1:0"]).is_ok(),
        "port 0 picks two ports"
    );
    assert!(listen(&["127.0.0.1:3000", "127.0.0.2:3000"]).is_ok());
    assert!(
        listen(&["0.0.0.0:3000", "[::]:3000"]).is_ok(),
        "IPv6 listeners are IPv6-only"
    );
    for pair in [
        ["127.0.0.1:3000", "127.0.0.1:3000"],
        ["127.0.0.1:3000", "0.0.0.0:3000"],
        ["[::]:3000", "[::1]:3000"],
    ] {
        assert_eq!(
            listen(&pair).unwrap_err(),
            format!(
                "invalid `listen` = {:?}: overlaps {:?}: the second bind would fail as a busy port",
                pair[1], pair[0]
            )
        );
    }
    let many = vec!["127.0.0.1:0"; MAX_LISTENERS + 1];
    assert!(listen(&many)
        .unwrap_err()
        .starts_with("invalid `listen` = [257 addresses]"));
    let error = refused("listen = [\"0.0.0.0:9464\"]\n[metrics]\naddress = \"9464\"\n");
    assert!(
        error.starts_with(
            "invalid `metrics.address` = \"127.0.0.1:9464\": overlaps `listen` \"0.0.0.0:9464\""
        ),
        "{error}"
    );
}

#[test]
fn permission_bits_are_read_as_the_kernel_does() {
    let nobody = Identity {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
        who: " by user \"nobody\" (uid 65534)".into(),
    };
    let root = Identity {
        uid: 0,
        gid: 0,
        groups: vec![0],
        who: String::new(),
    };
    let dir = std::env::temp_dir().join(format!("herd-perm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    let mode = |m: u32| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap();
        std::fs::metadata(&file).unwrap()
    };
    if nix::unistd::geteuid().is_root() {
        // Owned by root: nobody is in the "others" class.
        assert!(!nobody.may(&mode(0o750), Access::Execute));
        assert!(nobody.may(&mode(0o701), Access::Execute));
        assert!(!nobody.may(&mode(0o701), Access::Read));
        assert!(nobody.may(&mode(0o705), Access::Read));
        // Root needs one execute bit on a file, none to search or read.
        assert!(root.may(&mode(0o100), Access::Execute));
        assert!(!root.may(&mode(0o600), Access::Execute));
        assert!(root.may(&mode(0o000), Access::Read));
        // A script needs reading too, and a runnable interpreter.
        mode(0o711);
        assert!(nobody
            .can_execute(&file, 0)
            .unwrap_err()
            .contains("is a script and not readable by user \"nobody\""));
        mode(0o755);
        assert!(nobody.can_execute(&file, 0).is_ok());
        std::fs::write(&file, "#!/nonexistent/interpreter\n").unwrap();
        assert!(nobody
            .can_execute(&file, 0)
            .unwrap_err()
            .starts_with("its interpreter: /nonexistent/interpreter"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = nobody.can_reach(&file).unwrap_err();
        assert!(
            error.starts_with(&format!("{} is not searchable by user", dir.display())),
            "{error}"
        );
    }
    // The owner class wins even when "others" would allow more.
    let owner = Identity {
        uid: nix::unistd::geteuid().as_raw(),
        gid: u32::MAX - 1,
        groups: vec![],
        who: " by its owner".into(),
    };
    if owner.uid != 0 {
        assert!(!owner.may(&mode(0o605), Access::Read));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ready_names_the_convention_and_ready_delay_is_its_old_name() {
    assert_eq!(with("").unwrap().ready, Readiness::Herd);
    assert_eq!(with("ready = \"herd\"\n").unwrap().ready, Readiness::Herd);
    let delay = with("ready = \"delay:200ms\"\n").unwrap();
    assert_eq!(delay.ready.delay(), Some(Duration::from_millis(200)));
    assert_eq!(delay.ready.name(), "delay:200ms");
    // The alias means the same.
    let alias = with("ready_delay = \"200ms\"\n").unwrap();
    assert_eq!(alias.ready, delay.ready);
    assert_eq!(
        refused("ready = \"soon\"\n"),
        "invalid `ready` = \"soon\": expected one of: herd, notify, tcp, http:/PATH (e.g. \"http:/health\"), delay:DUR (e.g. \"delay:1s\")"
    );
    assert!(refused("ready = 3\n").starts_with("invalid `ready` = 3: expected one of"));
    assert!(refused("ready = \"delay:soon\"\n")
        .starts_with("invalid `ready` = \"delay:soon\": the delay \"soon\": expected a number"));
    assert!(refused("ready_timeout = \"2s\"\nready = \"delay:2s\"\n")
        .starts_with("invalid `ready` = \"delay:2s\": must be shorter than `ready_timeout` (2s)"));
    // Both set: refused, naming both.
    let both = refused("ready = \"herd\"\nready_delay = \"1s\"\n");
    assert!(both.starts_with("invalid `ready_delay` = \"1s\": `ready` = \"herd\" is set too"));
    // The flag is read as the key is, and replaces the file's value.
    let mut config = Config::parse("ready = \"delay:1s\"\n").unwrap();
    config
        .apply(Overrides {
            ready: Some("herd".into()),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(config.ready, Some(Readiness::Herd));
    let mut config = Config::default();
    let flag = config.apply(Overrides {
        ready: Some("tcp:".into()),
        ..Overrides::default()
    });
    assert!(flag
        .unwrap_err()
        .to_string()
        .starts_with("invalid `ready` = \"tcp:\""));
}

#[test]
fn handoff_threads_are_counted_refused_by_name_or_resolved_for_the_host() {
    assert_eq!(with("handoff_threads = 3\n").unwrap().handoff_threads, 3);
    assert_eq!(
        refused("handoff_threads = 8\n"),
        "invalid `handoff_threads` = 8: must be between 1 and 7"
    );
    assert_eq!(
        Config::parse("handoff_threads = \"many\"")
            .unwrap_err()
            .message,
        "invalid `handoff_threads` = \"many\": expected a number from 1 to 7 or \"auto\""
    );
    // More than one where herd accepts nothing, or the workers cannot count per thread.
    for (extra, why) in [
        ("mode = \"shared\"\n", "mode \"shared\" has the kernel deal"),
        (
            "mode = \"reuseport\"\n",
            "mode \"reuseport\" has the kernel deal",
        ),
        ("rotation = \"kernel\"\n", "dealt by the kernel here"),
        (
            "protocol = \"node-cluster\"\nrotation = \"handoff\"\n",
            "Node cluster workers take connections from one thread",
        ),
    ] {
        let error = refused(&format!("handoff_threads = 2\n{extra}"));
        assert!(
            error.starts_with("invalid `handoff_threads` = 2: ") && error.contains(why),
            "{extra}: {error}"
        );
        // One thread is no refusal there, and "auto" is one.
        assert_eq!(
            with(&format!("handoff_threads = 1\n{extra}"))
                .unwrap()
                .handoff_threads,
            1
        );
        assert_eq!(with(extra).unwrap().handoff_threads, 1, "{extra}");
    }
    // "auto": one per 8 cores, 1 to 7.
    let auto = with("").unwrap().handoff_threads;
    let expected = (available_cores() / CORES_PER_HANDOFF_THREAD).clamp(1, 7);
    assert_eq!(auto, expected);
}
