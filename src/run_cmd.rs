//! `herd run`: a herd started afresh, or one that `herd upgrade`
//! re-executed, which takes over the running workers.

use std::process::ExitCode;

use herd::config::ConfigSource;

use super::{runtime, EXIT_CONFIG};

/// `herd run`: the exit code of the run (README, "Signals and exit codes").
/// Messages go through herd's stderr queue, as its log does, so a stderr
/// nobody reads cannot keep herd from exiting.
pub fn run(source: ConfigSource) -> ExitCode {
    use herd::worker_output::eprint_line;
    if let Some(inherited) = herd::upgrade::inherited() {
        return run_upgraded(source, inherited);
    }
    let settings = match source.load() {
        Ok(settings) => settings,
        Err(e) => {
            eprint_line(&format!("herd: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match runtime("herd") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(herd::primary::run_with_os_signals(source, settings)) {
        Ok(herd::primary::Outcome::Clean) => ExitCode::SUCCESS,
        Ok(herd::primary::Outcome::Forced) => ExitCode::FAILURE,
        Err(e) => {
            eprint_line(&format!("herd: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// `herd run` in a herd that `herd upgrade` re-executed: it takes over the
/// running workers (or gives them back to the old binary).
fn run_upgraded(
    source: ConfigSource,
    inherited: Result<herd::upgrade::Inherited, String>,
) -> ExitCode {
    use herd::worker_output::eprint_line;
    let inherited = match inherited {
        Ok(inherited) => inherited,
        Err(e) => {
            eprint_line(&format!("herd: cannot take over from the old herd: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if let Err(why) = inherited.check_fds() {
        eprint_line(&format!("herd: cannot take over from the old herd: {why}"));
        let handover = inherited.handover().ok();
        let error = inherited.fall_back(&why, handover.as_ref());
        eprint_line(&format!(
            "herd: and the old binary could not run again: {error}"
        ));
        return ExitCode::FAILURE;
    }
    let settings = source.load().map_err(|e| e.to_string());
    let runtime = match runtime("herd") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(herd::primary::run_carried(source, settings, inherited)) {
        Ok(herd::primary::Outcome::Clean) => ExitCode::SUCCESS,
        Ok(herd::primary::Outcome::Forced) => ExitCode::FAILURE,
        Err(e) => {
            eprint_line(&format!("herd: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}
