//! deploy/docker and deploy/k8s, checked without a container engine or a
//! cluster (none runs here): every file parses, names files that exist and
//! ports that agree; the image's entrypoint is the command line the README
//! documents; the compose stack runs here as processes (herd with the
//! compose's own config, the seed's Express + Redis session app, a real
//! `redis-server`, a real `prometheus` with the compose's own scrape
//! config); the Kubernetes probes point at herd's metrics port, the pod
//! passes Pod Security "restricted", and the alert rules pass `promtool`
//! and name only metrics a real herd exports.
//!
//! The stack test needs `npm ci` in tests/fixtures/node-express and fails
//! without it; without redis-server, prometheus or promtool the tests that
//! run them are skipped, except in CI (`CI` set), where they fail.
//! scripts/test installs all of them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::hosts::session_app;
use common::servers::*;
use common::*;
use nix::sys::signal::Signal;
use serde_yaml_ng::Value as Yaml;

// ---- the files ----

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docker_dir() -> PathBuf {
    repo().join("deploy/docker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

fn seq_of<'a>(value: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list: {value:?}"))
}

fn herd_config(text: &str, what: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("{what} is not TOML: {e}"))
}

/// The port of an `"IP:PORT"` (or a bare `"PORT"`) as herd's config takes it.
fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address:?}"))
}

fn metrics_port(config: &toml::Table) -> u16 {
    port_of(
        config["metrics"]["address"]
            .as_str()
            .expect("metrics.address is set"),
    )
}

fn listen_ports(config: &toml::Table) -> Vec<u16> {
    config["listen"]
        .as_array()
        .expect("listen is a list")
        .iter()
        .map(|address| port_of(address.as_str().unwrap()))
        .collect()
}

/// A duration as herd and compose write them: "250ms", "10s", "1.5m", "1h".
fn duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or_else(|| panic!("no unit in {text:?}"));
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => panic!("unknown unit in {text:?}"),
    };
    Duration::from_secs_f64(seconds)
}

/// A herd config's duration key, or its default.
fn config_duration(config: &toml::Table, key: &str, default: &str) -> Duration {
    duration(config.get(key).and_then(|v| v.as_str()).unwrap_or(default))
}

/// `herd check -c FILE` on a config's text, in a scratch directory.
fn herd_check(config: &str) -> CliRun {
    let dir = scratch_dir("deploy-check");
    let path = write_config(&dir, config);
    let run = herd_cli(&dir, &["check", "-c", path.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    run
}

// ---- the Dockerfile ----

/// The Dockerfile's instructions in order, (KEYWORD, arguments), with
/// continuation lines joined and comments left out.
fn dockerfile() -> Vec<(String, String)> {
    let text = read(&docker_dir().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => pending.push_str(start),
            None => {
                pending.push_str(line);
                let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
                instructions.push((keyword.to_uppercase(), args.trim().to_string()));
                pending.clear();
            }
        }
    }
    instructions
}

/// The instructions of the image's last stage.
fn final_stage(instructions: &[(String, String)]) -> &[(String, String)] {
    let last_from = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("a FROM");
    &instructions[last_from..]
}

fn only<'a>(instructions: &'a [(String, String)], keyword: &str) -> &'a str {
    let found: Vec<&str> = instructions
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, args)| args.as_str())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {keyword} in the final stage: {found:?}"
    );
    found[0]
}

/// The image's ENTRYPOINT, from its JSON-array form (the only form that
/// makes herd PID 1 and so the receiver of STOPSIGNAL).
fn entrypoint() -> Vec<String> {
    let instructions = dockerfile();
    let args = only(final_stage(&instructions), "ENTRYPOINT");
    serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("ENTRYPOINT is not a JSON array ({e}): {args}"))
}

/// The config file the entrypoint names with `-c`.
fn entrypoint_config(entrypoint: &[String]) -> String {
    let at = entrypoint
        .iter()
        .position(|arg| arg == "-c")
        .unwrap_or_else(|| panic!("no -c in {entrypoint:?}"));
    entrypoint[at + 1].clone()
}

/// The uid of the final stage's USER (which must be numeric, so that
/// Kubernetes' runAsNonRoot can check it without reading /etc/passwd).
fn image_uid() -> u32 {
    let instructions = dockerfile();
    let user = only(final_stage(&instructions), "USER");
    let uid = user.split(':').next().unwrap();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {user} is not numeric"))
}

// ---- the compose file ----

fn compose() -> Yaml {
    yaml(&docker_dir().join("compose.yaml"))
}

/// A service's bind mounts of files beside compose.yaml: target → source.
fn mounts(service: &Yaml, name: &str) -> BTreeMap<String, PathBuf> {
    let mut mounts = BTreeMap::new();
    let Some(volumes) = service["volumes"].as_sequence() else {
        return mounts;
    };
    for volume in volumes {
        let volume = str_of(volume, &format!("a volume of {name}"));
        let mut parts = volume.split(':');
        let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
        if source.starts_with('.') || source.starts_with('/') {
            let source = docker_dir().join(source);
            assert!(
                source.is_file(),
                "{name} mounts {}, which does not exist",
                source.display()
            );
            mounts.insert(target.to_string(), source);
        }
    }
    mounts
}

/// A service's published ports as (host port, container port).
fn published(service: &Yaml) -> Vec<(u16, u16)> {
    service["ports"]
        .as_sequence()
        .map(|ports| {
            ports
                .iter()
                .map(|port| {
                    // "3000:3000" or "127.0.0.1:9464:9464"
                    let parts: Vec<u16> = str_of(port, "a port")
                        .rsplit(':')
                        .take(2)
                        .map(|p| p.parse().unwrap())
                        .collect();
                    (parts[1], parts[0])
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_parses_and_builds_from_files_that_exist() {
    let compose = compose();
    let services = compose["services"]
        .as_mapping()
        .expect("compose.yaml has services");
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["herd-app", "redis", "prometheus"]),
        "the seed's stack: the app under herd, Redis, Prometheus"
    );

    // The build: the repository as context, this directory's Dockerfile,
    // and the ignore file BuildKit reads beside it.
    let app = &compose["services"]["herd-app"];
    let context = docker_dir().join(str_of(&app["build"]["context"], "build.context"));
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "the build context is the repository (herd is built from source)"
    );
    let dockerfile = context.join(str_of(&app["build"]["dockerfile"], "build.dockerfile"));
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        docker_dir().join("Dockerfile").canonicalize().unwrap()
    );
    assert!(docker_dir().join("Dockerfile.dockerignore").is_file());

    // Every file a COPY takes from the context exists (with the ARGs'
    // defaults: the seed's app).
    let instructions = dockerfile_args_substituted();
    for (keyword, args) in &instructions {
        if keyword != "COPY" || args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo().join(source).exists(),
                "the Dockerfile copies {source}, which is not in the repository"
            );
        }
    }
}

#[test]
fn the_compose_stacks_configs_are_mounted_where_read_and_agree_on_ports() {
    let compose = compose();
    let app = &compose["services"]["herd-app"];
    let names: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();

    // herd's config: mounted where the entrypoint reads it.
    let app_mounts = mounts(app, "herd-app");
    let config_path = entrypoint_config(&entrypoint());
    let herd_toml = app_mounts
        .get(&config_path)
        .unwrap_or_else(|| panic!("herd-app mounts nothing at {config_path}: {app_mounts:?}"));
    assert_eq!(herd_toml, &docker_dir().join("./herd.toml"));
    let config = herd_config(&read(herd_toml), "herd.toml");
    let checked = herd_check(&read(herd_toml));
    assert_eq!(checked.code, Some(0), "herd check herd.toml: {checked:?}");

    // The app's port and the metrics port are published as herd binds them.
    let container_ports: BTreeSet<u16> = published(app).iter().map(|&(_, c)| c).collect();
    for port in listen_ports(&config) {
        assert!(
            container_ports.contains(&port),
            "listen port {port} is not published"
        );
    }
    let metrics = metrics_port(&config);
    assert!(container_ports.contains(&metrics), "metrics port {metrics}");

    // Prometheus scrapes herd-app at that port.
    let prometheus = &compose["services"]["prometheus"];
    let prometheus_mounts = mounts(prometheus, "prometheus");
    let scrape_config = &prometheus_mounts["/etc/prometheus/prometheus.yml"];
    let scrape = yaml(scrape_config);
    let job = &seq_of(&scrape["scrape_configs"], "scrape_configs")[0];
    let targets = seq_of(&job["static_configs"][0]["targets"], "targets");
    assert_eq!(
        targets,
        &vec![Yaml::from(format!("herd-app:{metrics}"))],
        "prometheus.yml scrapes herd's metrics port on the compose network"
    );
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    for command in seq_of(&prometheus["command"], "prometheus command") {
        if let Some(file) = str_of(command, "an argument").strip_prefix("--config.file=") {
            assert!(
                prometheus_mounts.contains_key(file),
                "{file} is not mounted"
            );
        }
    }

    // The app's Redis is the compose's redis service.
    let redis_url = str_of(&app["environment"]["REDIS_URL"], "REDIS_URL");
    let host = redis_url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split(':').next())
        .unwrap();
    assert!(
        names.contains(host),
        "REDIS_URL {redis_url} names no service"
    );

    // Docker's SIGKILL comes after herd's own graceful stop has had its time.
    let grace = duration(str_of(&app["stop_grace_period"], "stop_grace_period"));
    let needed = config_duration(&config, "shutdown_delay", "0s")
        + config_duration(&config, "shutdown_timeout", "10s");
    assert!(
        grace > needed,
        "stop_grace_period {grace:?} must exceed shutdown_delay + shutdown_timeout {needed:?}"
    );

    // Prometheus itself accepts the scrape config.
    if let Some(checked) = promtool(&["check", "config"], &[scrape_config.as_path()]) {
        assert!(checked.0, "promtool check config: {}", checked.1);
    }
}

/// The Dockerfile's instructions with `${NAME}` replaced by the ARGs'
/// default values.
fn dockerfile_args_substituted() -> Vec<(String, String)> {
    let instructions = dockerfile();
    let defaults: BTreeMap<String, String> = instructions
        .iter()
        .filter(|(keyword, _)| keyword == "ARG")
        .filter_map(|(_, args)| args.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    instructions
        .into_iter()
        .map(|(keyword, mut args)| {
            for (name, value) in &defaults {
                args = args.replace(&format!("${{{name}}}"), value);
            }
            (keyword, args)
        })
        .collect()
}

#[test]
fn the_images_entrypoint_is_the_one_the_readme_documents() {
    let entrypoint = entrypoint();
    let containers = readme_section("Containers");
    let documented = containers
        .lines()
        .find_map(|line| line.trim().strip_prefix("ENTRYPOINT "))
        .expect("README's Containers section shows the image's ENTRYPOINT line");
    let documented: Vec<String> = serde_json::from_str(documented).unwrap();
    assert_eq!(
        entrypoint, documented,
        "the Dockerfile's ENTRYPOINT and README's"
    );
    // The README also spells it as a command line a user would type.
    let command_line = entrypoint.join(" ");
    assert!(
        containers.contains(&format!("`{command_line}`")),
        "README's Containers section says `{command_line}`"
    );
    assert_eq!(entrypoint[1], "run");

    let instructions = dockerfile_args_substituted();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(keyword, _)| keyword == "FROM")
        .map(|(_, args)| args.as_str())
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        stages[0].starts_with("rust:1-bookworm AS build"),
        "{stages:?}"
    );
    assert!(
        instructions.iter().any(|(keyword, args)| keyword == "RUN"
            && args.contains("cargo build --release --locked -p herd-cli -p herd-preload")),
        "the builder builds herd and its preload library"
    );

    // herd and its preload library land in one directory, the one the
    // entrypoint runs herd from: herd looks for the library beside itself.
    let last = final_stage(&instructions);
    let herd_dir = Path::new(&entrypoint[0]).parent().unwrap();
    let copied = last
        .iter()
        .find(|(keyword, args)| keyword == "COPY" && args.starts_with("--from=build"))
        .map(|(_, args)| args.split_whitespace().collect::<Vec<&str>>())
        .expect("the final stage copies from the builder");
    let destination = Path::new(copied.last().unwrap());
    assert_eq!(destination, herd_dir, "{copied:?}");
    let names: BTreeSet<&str> = copied[1..copied.len() - 1]
        .iter()
        .map(|source| source.rsplit('/').next().unwrap())
        .collect();
    assert!(
        names.contains("herd") && names.contains("libherd_preload.so"),
        "{names:?}"
    );

    assert_eq!(only(last, "STOPSIGNAL"), "SIGTERM");
    let uid = image_uid();
    assert_ne!(uid, 0, "the image runs as a non-root user");
    assert!(
        last.iter()
            .any(|(keyword, args)| keyword == "RUN" && args.contains(&format!("--uid {uid}"))),
        "the final stage creates user {uid}"
    );
}

// ---- the stack, as processes ----

/// Whether `program --version` runs; else skipped (or, in CI, failed).
fn have(test: &str, program: &str) -> bool {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => skip_unless_ci(
            test,
            &format!("needs {program} ({e}); scripts/test installs it"),
        ),
    }
}

/// `promtool ARGS FILES`: (success, output); None (skipped) without promtool.
fn promtool(args: &[&str], files: &[&Path]) -> Option<(bool, String)> {
    if !have("promtool", "promtool") {
        return None;
    }
    let out = Command::new("promtool")
        .args(args)
        .args(files)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

/// A real Prometheus running deploy/docker/prometheus.yml with the target
/// moved to `target` and a 1 s interval (the file's 15 s would make the
/// test wait).
fn prometheus_scraping(target: SocketAddr) -> Prometheus {
    let mut config = yaml(&docker_dir().join("prometheus.yml"));
    config["global"]["scrape_interval"] = Yaml::from("1s");
    config["global"]["scrape_timeout"] = Yaml::from("900ms");
    config["scrape_configs"][0]["static_configs"][0]["targets"] =
        Yaml::Sequence(vec![Yaml::from(target.to_string())]);
    Prometheus::with_config(
        "deploy-prometheus",
        &serde_yaml_ng::to_string(&config).unwrap(),
    )
}

#[test]
fn the_compose_stack_runs_as_processes_and_sessions_survive_a_worker_kill_and_a_reload() {
    let test = "the compose stack as processes";
    // A missing `npm ci` fails the test even where a program skips it.
    let app = session_app();
    if !(have(test, "redis-server") && have(test, "prometheus") && have(test, "node")) {
        return;
    }
    let Some(redis) = Redis::start("deploy-stack") else {
        return;
    };

    // herd runs compose.yaml's config file itself, from a directory that
    // holds the app as the image's /app does (`command` is relative to it).
    // Only the addresses move: to 127.0.0.1 and free ports, and the
    // control socket into that directory. --workers 2: "max" would count
    // this machine's cores, where the container counts its CPU limit.
    let dir = scratch_dir("deploy-stack");
    std::os::unix::fs::symlink(&app, dir.join("session-app.js")).unwrap();
    let config = docker_dir().join("herd.toml");
    let config = config.to_str().unwrap();
    // REDIS_URL in herd's environment, as compose.yaml sets it; and no
    // CAP_BPF, as in a container (Docker grants none by default) and
    // under Pod Security "restricted".
    let redis_env = format!("REDIS_URL={}", redis.url());
    let as_in_a_container = [
        "setpriv",
        "--bounding-set",
        "-bpf,-sys_admin,-perfmon",
        "--",
        "env",
        &redis_env,
    ];
    let herd = Herd::start_under(
        &dir,
        &as_in_a_container,
        &[
            "-c",
            config,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--control",
            "herd.sock",
            "--workers",
            "2",
        ],
    );
    let first = herd.wait_all_ready(2);
    let addr = herd.addr();
    // What README says falls back: the kernel rotation, to hand-offs.
    herd.wait_for_event("kernel_rotation_unavailable", &[], 1);
    let mut visitor = Visitor::default();
    assert_eq!(
        visitor.visits(addr, 0, 4),
        first,
        "both workers serve the session"
    );

    let prometheus = prometheus_scraping(metrics_addr(&herd));
    prometheus.wait_until("herd's target up", Prometheus::targets_up);

    // A worker SIGKILLed: herd restarts its slot, the session goes on.
    let status = herd.status();
    let killed = pids_of(&status)[&0];
    signal(killed, Signal::SIGKILL);
    let restarted = wait_for_status(&herd.dir, "slot 0 restarted", |s| {
        all_ready(s, 2) && pids_of(s)[&0] != killed
    });
    let after_kill: BTreeSet<u32> = pids_of(&restarted).into_values().collect();
    assert_eq!(visitor.visits(addr, 4, 4), after_kill);

    // A rolling reload (re-reading the same herd.toml): new workers, the
    // same session.
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "`herd reload`: {reload:?}");
    let reloaded = herd.wait_all_ready(2);
    assert!(
        reloaded.is_disjoint(&after_kill),
        "{after_kill:?} then {reloaded:?}"
    );
    assert_eq!(visitor.visits(addr, 8, 4), reloaded);

    // Prometheus, scraping with the compose's config, saw both.
    prometheus.wait_until("the restart and the reload", |p| {
        p.query("sum(herd_worker_restarts_total{job=\"herd\",reason=\"signal\"})")
            .is_some_and(|n| n >= 1.0)
            && p.query("herd_reloads_total{job=\"herd\",result=\"success\"}") == Some(1.0)
            && p.query("herd_workers{job=\"herd\",state=\"ready\"}") == Some(2.0)
            // Every visit handed off by herd, none dealt by the kernel.
            && p.query("sum(herd_connections_handed_off_total{job=\"herd\"})") == Some(12.0)
            && p.query("herd_connections_kernel_dealt_total{job=\"herd\"}") == Some(0.0)
    });
    assert!(herd.stop().success());
}

// ---- Kubernetes ----

fn k8s_dir() -> PathBuf {
    repo().join("deploy/k8s")
}

/// Every document of a (possibly multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

/// Every document under deploy/k8s, by kind; each kind once.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut by_kind = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        assert_eq!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml"),
            "{} in deploy/k8s (kubectl apply -f takes .yaml, .yml, .json)",
            file.display()
        );
        for doc in yaml_docs(&file) {
            let kind = str_of(&doc["kind"], "kind").to_string();
            assert!(doc["apiVersion"].is_string(), "{kind} has an apiVersion");
            assert!(doc["metadata"]["name"].is_string(), "{kind} has a name");
            let before = by_kind.insert(kind.clone(), doc);
            assert!(before.is_none(), "two {kind}s");
        }
    }
    by_kind
}

/// Every pair of `selector` is among the pods' `labels`.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let selector = selector.as_mapping().expect("a selector");
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| &labels[key.as_str().unwrap()] == value)
}

/// The Deployment's pod and its one container, with herd's config as the
/// pod gets it (the ConfigMap mounted where the entrypoint reads it).
struct Pod {
    manifests: BTreeMap<String, Yaml>,
    config_text: String,
}

impl Pod {
    fn of_the_deployment() -> Pod {
        let manifests = manifests();
        let kinds: BTreeSet<&str> = manifests.keys().map(String::as_str).collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "ConfigMap",
                "Deployment",
                "PodMonitor",
                "PrometheusRule",
                "Service"
            ])
        );
        let mut pod = Pod {
            manifests,
            config_text: String::new(),
        };
        let deployment = &pod.manifests["Deployment"];
        assert!(selects(
            &deployment["spec"]["selector"]["matchLabels"],
            pod.labels()
        ));
        assert_eq!(seq_of(&pod.spec()["containers"], "containers").len(), 1);
        // herd is the entrypoint: the image's, untouched.
        let container = pod.container();
        assert!(container["command"].is_null() && container["args"].is_null());
        let config_path = entrypoint_config(&entrypoint());
        let (config_dir, config_file) = config_path.rsplit_once('/').unwrap();
        let config_mount = pod.mount_of(config_dir);
        let config_volume = seq_of(&pod.spec()["volumes"], "volumes")
            .iter()
            .find(|v| v["name"] == config_mount["name"])
            .unwrap();
        let configmap = &pod.manifests["ConfigMap"];
        assert_eq!(
            config_volume["configMap"]["name"],
            configmap["metadata"]["name"]
        );
        pod.config_text = str_of(&configmap["data"][config_file], config_file).to_string();
        pod
    }

    fn spec(&self) -> &Yaml {
        &self.manifests["Deployment"]["spec"]["template"]["spec"]
    }

    fn labels(&self) -> &Yaml {
        &self.manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    }

    fn container(&self) -> &Yaml {
        &self.spec()["containers"][0]
    }

    fn config(&self) -> toml::Table {
        herd_config(&self.config_text, "the ConfigMap's config.toml")
    }

    /// The container's volume mount at `path`.
    fn mount_of(&self, path: &str) -> Yaml {
        seq_of(&self.container()["volumeMounts"], "volumeMounts")
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .clone()
    }

    /// The number of the container port `name`.
    fn port_named(&self, name: &str) -> u16 {
        seq_of(&self.container()["ports"], "ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")) as u16
    }

    /// A probe's or an endpoint's port: a name or a number.
    fn port(&self, port: &Yaml) -> u16 {
        match port {
            Yaml::String(name) => self.port_named(name),
            number => number.as_u64().expect("a port") as u16,
        }
    }
}

#[test]
fn the_kubernetes_probes_point_at_herds_metrics_port_and_the_grace_period_covers_the_stop() {
    let pod = Pod::of_the_deployment();
    let config = pod.config();

    // herd itself accepts the config.
    let checked = herd_check(&pod.config_text);
    assert_eq!(checked.code, Some(0), "herd check: {checked:?}");

    // The container's ports are herd's: the app's listener and metrics.
    assert_eq!(listen_ports(&config), vec![pod.port_named("http")]);
    let metrics = metrics_port(&config);
    assert_eq!(pod.port_named("metrics"), metrics);
    let container = pod.container();
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(str_of(&get["path"], probe), path, "{probe}");
        assert_eq!(
            pod.port(&get["port"]),
            metrics,
            "{probe} on herd's metrics.address port"
        );
    }

    // workers = "max", sized by a CPU limit.
    assert_eq!(config["workers"].as_str(), Some("max"));
    assert!(container["resources"]["limits"]["cpu"].is_string());

    // Kubernetes SIGKILLs at terminationGracePeriodSeconds: it covers
    // shutdown_delay (serving while /readyz fails), then shutdown_timeout
    // (draining), and a margin for herd's own exit.
    let delay = config_duration(&config, "shutdown_delay", "0s");
    assert!(delay > Duration::ZERO, "shutdown_delay is set");
    let drain = config_duration(&config, "shutdown_timeout", "10s");
    let seconds = pod.spec()["terminationGracePeriodSeconds"].as_u64();
    let grace = Duration::from_secs(seconds.expect("terminationGracePeriodSeconds"));
    let margin = Duration::from_secs(5);
    assert!(
        grace >= delay + drain + margin,
        "terminationGracePeriodSeconds {grace:?} < shutdown_delay {delay:?} + shutdown_timeout {drain:?} + {margin:?}"
    );
}

#[test]
fn the_kubernetes_pod_passes_pod_security_restricted() {
    let pod = Pod::of_the_deployment();
    let spec = pod.spec();
    let pod_security = &spec["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], Yaml::Bool(true));
    assert_eq!(
        pod_security["runAsUser"].as_u64(),
        Some(u64::from(image_uid()))
    );
    assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(
            spec[key].is_null() || spec[key] == Yaml::Bool(false),
            "{key}"
        );
    }
    let security = &pod.container()["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], Yaml::Bool(false));
    assert!(security["privileged"].is_null() || security["privileged"] == Yaml::Bool(false));
    assert_eq!(
        security["capabilities"]["drop"],
        Yaml::Sequence(vec![Yaml::from("ALL")])
    );
    assert!(
        security["capabilities"]["add"].is_null(),
        "no capability added"
    );
    for volume in seq_of(&spec["volumes"], "volumes") {
        assert!(
            volume["hostPath"].is_null(),
            "restricted allows no hostPath"
        );
    }
    // With a read-only root, the control socket's directory is a volume.
    assert_eq!(security["readOnlyRootFilesystem"], Yaml::Bool(true));
    let config = pod.config();
    let control = config["control"].as_str().expect("control is set");
    pod.mount_of(control.rsplit_once('/').unwrap().0);
}

#[test]
fn the_service_and_the_podmonitor_select_the_pods_and_their_ports() {
    let pod = Pod::of_the_deployment();
    let service = &pod.manifests["Service"];
    assert!(selects(&service["spec"]["selector"], pod.labels()));
    let listen = listen_ports(&pod.config());
    for port in seq_of(&service["spec"]["ports"], "Service ports") {
        let target = pod.port(&port["targetPort"]);
        assert!(
            listen.contains(&target),
            "the Service sends to the app, not to {target}"
        );
    }
    let monitor = &pod.manifests["PodMonitor"];
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        pod.labels()
    ));
    let endpoints = seq_of(
        &monitor["spec"]["podMetricsEndpoints"],
        "podMetricsEndpoints",
    );
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        assert_eq!(pod.port(&endpoint["port"]), metrics_port(&pod.config()));
        assert_eq!(endpoint["path"].as_str().unwrap_or("/metrics"), "/metrics");
    }
}

/// Every metric name in a PromQL expression that is herd's own, with the
/// label names its selector uses.
fn herd_metrics_in(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("herd_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut labels = Vec::new();
        if let Some(selector) = tail[end..].strip_prefix('{') {
            let selector = &selector[..selector.find('}').unwrap()];
            for matcher in selector.split(',') {
                let label = matcher.split(['=', '!', '~']).next().unwrap().trim();
                labels.push(label.to_string());
            }
        }
        found.push((name, labels));
        rest = &tail[end..];
    }
    found
}

#[test]
fn the_alert_rules_pass_promtool_and_name_only_metrics_a_real_herd_exports() {
    let manifests = manifests();
    let rule = &manifests["PrometheusRule"];
    let groups = &rule["spec"]["groups"];
    let alerts: Vec<&Yaml> = seq_of(groups, "groups")
        .iter()
        .flat_map(|group| seq_of(&group["rules"], "rules"))
        .collect();
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|a| str_of(&a["alert"], "alert"))
        .collect();
    for wanted in [
        "HerdSlotCrashLooping",
        "HerdWorkersHung",
        "HerdDroppingConnections",
    ] {
        assert!(names.contains(wanted), "{wanted} in {names:?}");
    }

    // The spec is a plain rules file: promtool checks it as Prometheus
    // would load it.
    let dir = scratch_dir("deploy-rules");
    let rules = dir.join("rules.yaml");
    let plain = serde_yaml_ng::to_string(&rule["spec"]).unwrap();
    std::fs::write(&rules, plain).unwrap();
    if let Some((ok, output)) = promtool(&["check", "rules"], &[rules.as_path()]) {
        assert!(ok, "promtool check rules: {output}");
        // And they fire as they should on a crash loop, a hung worker and
        // drops, and not on what is fine (the fixture says which).
        let cases = dir.join("alerts-test.yaml");
        std::fs::copy(
            repo().join("tests/fixtures/deploy/alerts-test.yaml"),
            &cases,
        )
        .unwrap();
        let (ok, output) = promtool(&["test", "rules"], &[cases.as_path()]).unwrap();
        assert!(ok, "promtool test rules: {output}");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // A real herd's /metrics, after a worker restart (restart counters
    // appear with the first one): every herd_ metric and label the alerts
    // name must be there.
    let herd = Herd::launch(
        "deploy-alerts",
        None,
        2,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let pids = herd.wait_ready(2);
    signal(pids[&0], Signal::SIGKILL);
    let addr = metrics_addr(&herd);
    let exported = wait_until("a restart in /metrics", || {
        let body = http(addr, "GET", "/metrics").2;
        body.contains("herd_worker_restarts_total{").then_some(body)
    });
    let mut labels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exported.lines().filter(|line| !line.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap();
        let labels = labels_of.entry(line[..end].to_string()).or_default();
        if let Some(selector) = line[end..].strip_prefix('{') {
            for pair in selector[..selector.find('}').unwrap()].split(',') {
                labels.insert(pair.split('=').next().unwrap().to_string());
            }
        }
    }
    for alert in &alerts {
        let expr = str_of(&alert["expr"], "expr");
        let used = herd_metrics_in(expr);
        assert!(!used.is_empty(), "{expr} names no herd metric");
        for (name, labels) in used {
            let known = labels_of.get(&name).unwrap_or_else(|| {
                panic!("{name} (in {expr}) is not in herd's /metrics:\n{exported}")
            });
            for label in labels {
                assert!(
                    label == "job" || known.contains(&label),
                    "{name} has no label {label} (in {expr}); it has {known:?}"
                );
            }
        }
        assert!(
            alert["labels"]["severity"].is_string(),
            "{expr} has a severity"
        );
        assert!(
            alert["annotations"]["summary"].is_string(),
            "{expr} has a summary"
        );
    }
    assert!(herd.stop().success());
}

// ---- workers = "max" in a container ----

/// A CPU cgroup of the test's own with a quota, removed on drop: cgroup v1's
/// `cpu` hierarchy, or v2 where the root delegates the `cpu` controller.
struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// A cgroup limited to `cpus` CPUs (a container's `--cpus`, a pod's CPU
    /// limit); None where this process cannot make one.
    fn new(name: &str, cpus: f64) -> Option<CpuQuota> {
        let period = 100_000u64;
        let quota = (cpus * period as f64) as u64;
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let name = format!("herd-test-{}-{name}", std::process::id());
        if v1.join("cpu.cfs_quota_us").is_file() {
            let dir = v1.join(name);
            std::fs::create_dir(&dir).ok()?;
            let cgroup = CpuQuota { dir };
            std::fs::write(cgroup.dir.join("cpu.cfs_period_us"), period.to_string()).ok()?;
            std::fs::write(cgroup.dir.join("cpu.cfs_quota_us"), quota.to_string()).ok()?;
            return Some(cgroup);
        }
        let delegated = std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?;
        if !delegated.split_whitespace().any(|c| c == "cpu") {
            return None;
        }
        let dir = v2.join(name);
        std::fs::create_dir(&dir).ok()?;
        let cgroup = CpuQuota { dir };
        std::fs::write(cgroup.dir.join("cpu.max"), format!("{quota} {period}")).ok()?;
        Some(cgroup)
    }

    /// `herd ARGS` run inside the cgroup (it joins before exec).
    fn run_herd(&self, dir: &Path, args: &[&str]) -> CliRun {
        let procs = self.dir.join("cgroup.procs");
        let join = format!("echo $$ > {} && exec \"$0\" \"$@\"", procs.display());
        herd_cli_under(dir, &["sh", "-c", &join], args, DEADLINE).unwrap()
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Every process run in it has exited (run_herd waits for it).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The worker count `herd check` reports: `config OK: N worker(s) of ...`.
fn checked_workers(run: &CliRun) -> usize {
    assert_eq!(run.code, Some(0), "herd check: {run:?}");
    run.stdout
        .strip_prefix("config OK: ")
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no worker count in {:?}", run.stdout))
}

/// What the README and the manifests promise: `workers = "max"` (in
/// compose's herd.toml and the ConfigMap) is the container's CPU limit,
/// rounded down, not the host's cores.
#[test]
fn workers_max_is_the_cpu_limit_rounded_down() {
    let test = "workers_max_is_the_cpu_limit_rounded_down";
    let dir = scratch_dir("deploy-cpus");
    let config = docker_dir().join("herd.toml");
    let args = ["check", "-c", config.to_str().unwrap()];
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(checked_workers(&herd_cli(&dir, &args)), cores);
    let Some(limited) = CpuQuota::new("cpus", 1.5) else {
        skip_unless_ci(
            test,
            "cannot make a cgroup with a CPU quota here (needs root and a cpu controller)",
        );
        return;
    };
    assert_eq!(
        checked_workers(&limited.run_herd(&dir, &args)),
        1,
        "1.5 CPUs"
    );
    drop(limited);
    if cores >= 3 {
        let limited = CpuQuota::new("cpus-2", 2.0).unwrap();
        assert_eq!(checked_workers(&limited.run_herd(&dir, &args)), 2, "2 CPUs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The probes the Deployment names answer on a real herd run with the
/// ConfigMap's config (its addresses, control socket and program swapped
/// for this machine's by flags): `/livez` and `/readyz` are 200 once the
/// workers are ready, and `/readyz` fails at SIGTERM, for `shutdown_delay`.
#[test]
fn the_kubernetes_probes_answer_on_a_real_herd_with_the_configmaps_config() {
    let pod = Pod::of_the_deployment();
    let dir = scratch_dir("deploy-k8s-probes");
    let config = dir.join("config.toml");
    std::fs::write(&config, &pod.config_text).unwrap();
    let control = dir.join("herd.sock");
    let herd = Herd::start_in(
        &dir,
        &[
            "-c",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--workers",
            "2",
            "--",
            hello_worker(),
        ],
    );
    herd.wait_ready(2);
    let metrics = metrics_addr(&herd);
    let container = pod.container();
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = str_of(&container[probe]["httpGet"]["path"], probe).to_string();
        let (code, _, body) = http(metrics, "GET", &path);
        assert_eq!(code, 200, "{probe} {path}: {body}");
    }
    signal(herd.pid(), nix::sys::signal::Signal::SIGTERM);
    herd.wait_for_event("stop_delayed", &[], 1);
    let (code, _, body) = http(metrics, "GET", "/readyz");
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: stopping after shutdown_delay\n")
    );
    let mut herd = herd;
    assert!(herd.wait_exit().success());
}
