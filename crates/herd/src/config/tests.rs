//! Validation, key by key: every refusal names the key, the value and why.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn minimal() -> Config {
    Config::parse("listen = [\"127.0.0.1:0\"]\ncommand = [\"true\"]\n").unwrap()
}

fn error_of(config: &Config) -> String {
    config.validate().unwrap_err().to_string()
}

#[test]
fn the_repository_config_parses() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.toml")).unwrap();
    let config = Config::parse(&text).unwrap();
    assert_eq!(config.workers, WorkerCount::Named("max".into()));
    assert_eq!(config.listen, ["127.0.0.1:3000"]);
}

#[test]
fn defaults_fill_what_is_not_written() {
    let settings = minimal().validate().unwrap();
    assert_eq!(settings.workers, available_cores());
    assert_eq!(settings.mode, Mode::RoundRobin);
    assert_eq!(settings.backlog, 511);
    assert_eq!(settings.handoff.max_unacked, 64);
    assert!(settings.program.ends_with("true"));
}

#[test]
fn kernel_rotation_is_for_node_round_robin_and_named_when_misused() {
    let mut config = minimal();
    assert!(!config.validate().unwrap().handoff.kernel_rotation);
    config.protocol = "node-cluster".into();
    assert!(config.validate().unwrap().handoff.kernel_rotation);
    config.mode = "sticky".into();
    assert!(!config.validate().unwrap().handoff.kernel_rotation);
    config.mode = "round-robin".into();
    config.rotation = "handoff".into();
    assert!(!config.validate().unwrap().handoff.kernel_rotation);
    config.rotation = "sideways".into();
    assert_eq!(
        error_of(&config),
        "invalid `rotation` = \"sideways\": expected one of: auto, kernel, handoff"
    );
    config.rotation = "kernel".into();
    config.protocol = "herd".into();
    assert!(error_of(&config).starts_with(
        "invalid `rotation` = \"kernel\": kernel rotation is for Node cluster workers"
    ));
}

#[test]
fn the_worker_protocol_is_detected_or_named() {
    assert_eq!(minimal().validate().unwrap().protocol, WorkerProtocol::Herd);
    let mut config = minimal();
    config.command = vec!["node".into(), "app.js".into()];
    if which_node().is_some() {
        assert_eq!(
            config.validate().unwrap().protocol,
            WorkerProtocol::NodeCluster
        );
        config.mode = "shared".into();
        assert_eq!(config.validate().unwrap().mode, Mode::Shared);
        config.mode = "reuseport".into();
        assert!(error_of(&config).starts_with("invalid `mode` = \"reuseport\": Node cluster"));
    }
    let mut config = minimal();
    config.protocol = "node-cluster".into();
    assert_eq!(
        config.validate().unwrap().protocol,
        WorkerProtocol::NodeCluster
    );
    // Node apps say what they listen on; herd workers must be told.
    config.listen.clear();
    assert!(config.validate().unwrap().listen.is_empty());
    config.protocol = "herd".into();
    assert!(error_of(&config).starts_with("invalid `listen` = []: no address"));
    config.protocol = "grpc".into();
    assert_eq!(
        error_of(&config),
        "invalid `protocol` = \"grpc\": expected one of: auto, herd, node-cluster"
    );
}

fn which_node() -> Option<PathBuf> {
    resolve_program("node", None, &herds_identity()).ok()
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let error = Config::parse("wrokers = 4\n").unwrap_err();
    assert!(error.contains("unknown field `wrokers`"), "{error}");
    let error = Config::parse("[handoff]\nmax_unaked = 4\n").unwrap_err();
    assert!(error.contains("max_unaked"), "{error}");
}

#[test]
fn wrong_types_name_the_key() {
    let error = Config::parse("backlog = \"lots\"\n").unwrap_err();
    assert!(error.contains("backlog"), "{error}");
}

#[test]
fn bad_values_name_key_value_and_reason() {
    let mut config = minimal();
    config.workers = WorkerCount::Count(0);
    assert_eq!(
        error_of(&config),
        "invalid `workers` = 0: must be between 1 and 1024"
    );
    config.workers = WorkerCount::Named("many".into());
    assert!(error_of(&config).starts_with("invalid `workers` = \"many\""));

    let mut config = minimal();
    config.listen = vec!["localhost:80".into()];
    assert!(error_of(&config).starts_with("invalid `listen` = \"localhost:80\": expected IP:PORT"));

    let mut config = minimal();
    config.mode = "fastest".into();
    assert_eq!(
        error_of(&config),
        "invalid `mode` = \"fastest\": expected one of: round-robin, sticky, least-conn, shared, reuseport"
    );

    let mut config = minimal();
    config.handoff.ack_timeout = "10".into();
    assert!(error_of(&config).starts_with("invalid `handoff.ack_timeout` = \"10\": missing unit"));
}

#[test]
fn worker_program_must_exist_and_be_executable() {
    let mut config = minimal();
    config.command = vec!["no-such-herd-worker".into()];
    assert_eq!(
        error_of(&config),
        "invalid `command` = \"no-such-herd-worker\": not found in PATH"
    );
    let plain = std::env::temp_dir().join(format!("herd-config-test-{}", std::process::id()));
    std::fs::write(&plain, "not a program").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    config.command = vec![plain.display().to_string()];
    let error = error_of(&config);
    std::fs::remove_file(&plain).unwrap();
    assert!(
        error.ends_with("is not executable (mode 0644, owner uid 0 gid 0)")
            || !nix::unistd::geteuid().is_root(),
        "{error}"
    );
    assert!(error.contains("is not executable"), "{error}");
    config.command = vec![std::env::temp_dir().display().to_string()];
    assert!(error_of(&config).ends_with("is not a file"));
    config.command = vec![];
    assert!(error_of(&config).starts_with("invalid `command` = []: no worker program"));
}

#[test]
fn overrides_replace_file_values() {
    let mut config = minimal();
    config.apply(Overrides {
        listen: vec!["[::1]:0".into()],
        workers: Some("3".into()),
        mode: Some("sticky".into()),
        command: vec!["sh".into(), "-c".into(), "exit".into()],
        ..Overrides::default()
    });
    let settings = config.validate().unwrap();
    assert_eq!(settings.listen, ["[::1]:0".parse().unwrap()]);
    assert_eq!(settings.workers, 3);
    assert_eq!(settings.mode, Mode::Sticky);
    assert_eq!(settings.args, ["-c", "exit"]);
}

#[test]
fn metrics_address_defaults_to_loopback() {
    let mut config = minimal();
    assert_eq!(config.validate().unwrap().metrics, None);
    config.metrics.address = Some("9464".into());
    assert_eq!(
        config.validate().unwrap().metrics,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    config.metrics.address = Some("[::1]:9000".into());
    assert_eq!(
        config.validate().unwrap().metrics,
        Some("[::1]:9000".parse().unwrap())
    );
    config.metrics.address = Some("everywhere".into());
    assert!(error_of(&config).starts_with("invalid `metrics.address` = \"everywhere\""));
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("lots").is_err());
    assert!(parse_size("0").is_err());
}

#[test]
fn users_and_groups_resolve_or_are_refused() {
    let mut config = minimal();
    config.user = Some("root".into());
    let root = config.validate().unwrap().run_as.unwrap();
    assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
    assert!(root.groups.contains(&0), "{root:?}");
    config.user = Some("no-such-user-herd".into());
    assert_eq!(
        error_of(&config),
        "invalid `user` = \"no-such-user-herd\": no such user on this host"
    );
    config.user = None;
    config.group = Some("root".into());
    assert!(error_of(&config).starts_with("invalid `group`"));
}

#[test]
fn hang_timeout_defaults_to_30s_and_0s_turns_it_off() {
    let mut config = minimal();
    assert_eq!(
        config.validate().unwrap().hang_timeout,
        Some(Duration::from_secs(30))
    );
    config.hang_timeout = "0s".into();
    assert_eq!(config.validate().unwrap().hang_timeout, None);
    config.hang_timeout = "soon".into();
    assert!(error_of(&config).starts_with("invalid `hang_timeout` = \"soon\""));
}

#[test]
fn kill_mode_is_one_of_three_or_named() {
    let mut config = minimal();
    assert_eq!(config.validate().unwrap().kill_mode, KillMode::Auto);
    config.kill_mode = "process-group".into();
    assert_eq!(config.validate().unwrap().kill_mode, KillMode::ProcessGroup);
    config.kill_mode = "control-group".into();
    assert_eq!(config.validate().unwrap().kill_mode, KillMode::ControlGroup);
    config.kill_mode = "process".into();
    assert_eq!(
        error_of(&config),
        "invalid `kill_mode` = \"process\": expected one of: auto, control-group, process-group"
    );
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn values_run_would_crash_or_spin_on_are_refused() {
    let refused = |edit: &dyn Fn(&mut Config)| {
        let mut config = minimal();
        edit(&mut config);
        error_of(&config)
    };
    assert!(refused(&|c| c.monitor_interval = "0s".into())
        .starts_with("invalid `monitor_interval` = \"0s\": must be at least 10ms"));
    assert!(refused(&|c| c.monitor_interval = "0.0000000001s".into())
        .starts_with("invalid `monitor_interval`"));
    assert!(minimal_with(|c| c.monitor_interval = "10ms".into()).is_ok());
    assert!(refused(&|c| c.ready_timeout = "0s".into())
        .starts_with("invalid `ready_timeout` = \"0s\": must be more than 0s"));
    assert!(refused(&|c| {
        c.ready_timeout = "2s".into();
        c.ready_delay = Some("2s".into());
    })
    .starts_with("invalid `ready_delay` = \"2s\": must be shorter than `ready_timeout` (2s)"));
    assert!(minimal_with(|c| c.ready_delay = Some("200ms".into())).is_ok());
    assert!(refused(&|c| c.restart.backoff_base = "0ms".into())
        .starts_with("invalid `restart.backoff_base` = \"0ms\": must be more than 0s"));
    assert!(refused(&|c| {
        c.env.insert("A".into(), "x\0y".into());
    })
    .starts_with("invalid `env.A` = \"x\\0y\": contains a NUL byte"));
    assert!(refused(&|c| c.command.push("a\0b".into())).ends_with("argument 1 contains a NUL byte"));
}

fn minimal_with(edit: impl Fn(&mut Config)) -> Result<Settings, ConfigError> {
    let mut config = minimal();
    edit(&mut config);
    config.validate()
}

#[test]
fn the_control_path_must_fit_sun_path() {
    let fits = "s".repeat(MAX_CONTROL_PATH_LEN);
    assert!(minimal_with(|c| c.control = fits.clone()).is_ok());
    let long = "s".repeat(MAX_CONTROL_PATH_LEN + 1);
    let error = minimal_with(|c| c.control = long.clone())
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(&format!(
            "invalid `control` = {long:?}: 108 bytes long; a Unix socket path holds at most 107"
        )),
        "{error}"
    );
    let error = minimal_with(|c| c.control = String::new()).unwrap_err();
    assert!(error
        .to_string()
        .starts_with("invalid `control` = \"\": empty"));
}

#[test]
fn listeners_that_cannot_all_be_bound_are_refused() {
    let listen =
        |addrs: &[&str]| minimal_with(|c| c.listen = addrs.iter().map(|a| a.to_string()).collect());
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
        let error = listen(&pair).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "invalid `listen` = {:?}: overlaps {:?}: the second bind would fail as a busy port",
                pair[1], pair[0]
            )
        );
    }
    let many = vec!["127.0.0.1:0"; MAX_LISTENERS + 1];
    assert!(listen(&many)
        .unwrap_err()
        .to_string()
        .starts_with("invalid `listen` = [257 addresses]"));
    let error = minimal_with(|c| {
        c.listen = vec!["0.0.0.0:9464".into()];
        c.metrics.address = Some("9464".into());
    })
    .unwrap_err()
    .to_string();
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
fn a_reload_names_every_key_only_a_restart_can_change() {
    let running = minimal().validate().unwrap();
    let same = minimal().validate().unwrap();
    assert!(running.restart_needed(&same).is_empty());
    // What a reload applies itself.
    let applied = minimal_with(|c| {
        c.workers = WorkerCount::Count(3);
        c.env.insert("A".into(), "b".into());
        c.command = vec!["sh".into()];
        c.hang_timeout = "1s".into();
        c.ready_timeout = "5s".into();
        c.shutdown_timeout = "1s".into();
        c.handoff.max_unacked = 3;
        c.handoff.queue_limit = 0;
        c.restart.backoff_base = "1s".into();
        c.reload_batch = 2;
        c.user = Some("root".into());
    })
    .unwrap();
    assert_eq!(running.restart_needed(&applied), Vec::<String>::new());
    for (edit, named) in [
        (
            Box::new(|c: &mut Config| c.listen = vec!["127.0.0.2:0".into()])
                as Box<dyn Fn(&mut Config)>,
            "`listen` ([127.0.0.1:0] -> [127.0.0.2:0])",
        ),
        (Box::new(|c| c.backlog = 64), "`backlog` (511 -> 64)"),
        (
            Box::new(|c| c.mode = "sticky".into()),
            "`mode` (round-robin -> sticky)",
        ),
        (
            Box::new(|c| c.kill_mode = "process-group".into()),
            "`kill_mode` (auto -> process-group)",
        ),
        (
            Box::new(|c| c.protocol = "node-cluster".into()),
            "`protocol` (herd -> node-cluster)",
        ),
        (
            Box::new(|c| c.control = "other.sock".into()),
            "`control` (herd.sock -> other.sock)",
        ),
        (
            Box::new(|c| c.metrics.address = Some("9000".into())),
            "`metrics.address` (none -> 127.0.0.1:9000)",
        ),
        (
            Box::new(|c| c.monitor_interval = "2s".into()),
            "`monitor_interval` (1s -> 2s)",
        ),
    ] {
        let new = minimal_with(edit).unwrap();
        assert_eq!(running.restart_needed(&new), [named]);
    }
    // Node workers: rotation on its own, and not again when mode changes it.
    let node = minimal_with(|c| c.protocol = "node-cluster".into()).unwrap();
    let handoff = minimal_with(|c| {
        c.protocol = "node-cluster".into();
        c.rotation = "handoff".into();
    })
    .unwrap();
    assert_eq!(
        node.restart_needed(&handoff),
        ["`rotation` (kernel -> handoff)"]
    );
    let sticky = minimal_with(|c| {
        c.protocol = "node-cluster".into();
        c.mode = "sticky".into();
    })
    .unwrap();
    assert_eq!(
        node.restart_needed(&sticky),
        ["`mode` (round-robin -> sticky)"]
    );
}
