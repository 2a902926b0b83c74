//! `herd upgrade` (the client) and `herd __upgrade-probe` (the dry run a
//! running herd starts of the binary it is about to re-execute).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use herd::config::ConfigSource;
use herd::control::{self, ControlRequest};
use herd::status::UpgradeRecord;

/// How often the client asks for herd's status while the new binary takes over.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// `herd upgrade`: asks herd to re-execute itself, then waits (at most
/// `timeout` per step) until the new binary took over (exit 0) or herd
/// says why it did not (exit 1; herd goes on as it was). herd's answer
/// may never come: its connection to us closes with the exec, and the
/// status of the herd that answers then tells.
pub fn upgrade(path: &Path, timeout: Duration) -> ExitCode {
    let record = |what: &str| match control::request_within(path, &ControlRequest::Status, timeout)
    {
        Ok(response) => Ok(response.status.map(|s| s.upgrades).unwrap_or_default()),
        Err(e) => Err(format!("herd: {what}: {e}")),
    };
    let before = match record("before the upgrade") {
        Ok(before) => before,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(3);
        }
    };
    match control::request_within(path, &ControlRequest::Upgrade, timeout) {
        Ok(response) if !response.ok => {
            eprintln!("herd: {}", response.message);
            return ExitCode::FAILURE;
        }
        // Re-executing: the answer is the status of the herd that follows.
        Ok(_) | Err(_) => {}
    }
    // The dry run may take up to its own timeout, then the takeover.
    let deadline = Instant::now() + herd::upgrade::PROBE_TIMEOUT + timeout;
    loop {
        if let Ok(after) = record("after the upgrade") {
            if let Some(code) = outcome(&before, &after) {
                return code;
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "herd: no upgrade outcome within {:?}: see herd's log (events upgrade_failed, upgraded)",
                deadline.duration_since(Instant::now()) + herd::upgrade::PROBE_TIMEOUT + timeout
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// What the record says of the upgrade asked for between `before` and `after`.
fn outcome(before: &UpgradeRecord, after: &UpgradeRecord) -> Option<ExitCode> {
    let said = after.last.clone().unwrap_or_default();
    if after.done > before.done {
        println!("{said}");
        Some(ExitCode::SUCCESS)
    } else if after.failed > before.failed {
        eprintln!("herd: {said}");
        Some(ExitCode::FAILURE)
    } else {
        None
    }
}

/// `herd __upgrade-probe <run arguments>`: can this binary take over from
/// a running herd with these arguments? It loads the config as `herd run`
/// would and answers with each handover version it reads, a line each (an
/// older herd looks for its own); nothing is bound or started.
pub fn probe(source: ConfigSource) -> ExitCode {
    match source.load() {
        Ok(_) => {
            for version in herd::upgrade::HANDOVER_READS {
                println!("{} {version}", herd::upgrade::PROBE_ANSWER);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herd: {e}");
            ExitCode::FAILURE
        }
    }
}
