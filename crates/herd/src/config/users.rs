//! Who the workers run as, and what that identity may reach: the user and
//! group lookup (with supplementary groups, as initgroups), whether herd may
//! switch to them, and whether the program, its interpreter and `cwd` are
//! reachable and executable for them, so `check` refuses what `run` would
//! fail on.

use super::*;

/// Who workers run as (`user`, `group`): resolved when the config is
/// loaded, so starting a worker needs no lookup between `fork` and `exec`
/// (the group database is read through NSS, which is not async-signal-safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The passwd name, as `USER` and `LOGNAME`.
    pub name: String,
    pub uid: u32,
    /// `group`, or the user's primary group.
    pub gid: u32,
    /// The supplementary groups, as `initgroups(3)` (and so `su -` and
    /// systemd's `User=`) sets them: `gid` and every group the group
    /// database lists the user in. Without them a worker would lose the
    /// access its user has through a group (e.g. `ssl-cert` for keys).
    pub groups: Vec<u32>,
    /// The passwd home directory, as `HOME`.
    pub home: PathBuf,
}

impl RunAs {
    /// herd already runs with exactly these ids: there is nothing to switch
    /// (and an unprivileged herd could not call setgroups).
    pub fn is_herds_own(&self) -> bool {
        let own = herds_identity();
        own.uid == self.uid && own.gid == self.gid && own.groups == sorted(&self.groups)
    }

    pub(super) fn identity(&self) -> Identity {
        Identity {
            uid: self.uid,
            gid: self.gid,
            groups: sorted(&self.groups),
            who: format!(" by user {:?} (uid {})", self.name, self.uid),
        }
    }
}

pub(super) fn sorted(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Looks up `user` and `group` (names or numeric ids) for the privilege drop.
pub(super) fn resolve_user(user_name: &str, group: Option<&str>) -> Result<RunAs, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let found = match user_name.parse::<u32>() {
        Ok(id) => User::from_uid(Uid::from_raw(id)),
        Err(_) => User::from_name(user_name),
    };
    let user = found.ok().flatten().ok_or_else(|| {
        invalid(
            "user",
            format!("{user_name:?}"),
            "no such user on this host",
        )
    })?;
    let gid = match group {
        None => user.gid,
        Some(group_name) => {
            let found = match group_name.parse::<u32>() {
                Ok(id) => Group::from_gid(Gid::from_raw(id)),
                Err(_) => Group::from_name(group_name),
            };
            found
                .ok()
                .flatten()
                .ok_or_else(|| {
                    invalid(
                        "group",
                        format!("{group_name:?}"),
                        "no such group on this host",
                    )
                })?
                .gid
        }
    };
    let groups = std::ffi::CString::new(user.name.as_str())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, gid).ok())
        .ok_or_else(|| {
            invalid(
                "user",
                format!("{user_name:?}"),
                "cannot read its groups from the group database",
            )
        })?;
    let run_as = RunAs {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        home: user.dir,
    };
    if !run_as.is_herds_own() && !can_switch_user() {
        return Err(invalid(
            "user",
            format!("{user_name:?}"),
            format!(
                "herd runs as uid {} without CAP_SETUID and CAP_SETGID, so it cannot start workers as another user or group: run herd as root, or leave `user` out",
                nix::unistd::geteuid()
            ),
        ));
    }
    Ok(run_as)
}

/// herd has CAP_SETUID and CAP_SETGID (root normally has every capability).
pub(super) fn can_switch_user() -> bool {
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return nix::unistd::geteuid().is_root();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SETGID) != 0 && caps & (1 << CAP_SETUID) != 0)
}

/// The ids a path's permission bits are checked against: the worker's.
#[derive(Debug)]
pub(super) struct Identity {
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Sorted.
    pub(super) groups: Vec<u32>,
    /// How a refusal names it: ` by user "nobody" (uid 65534)`, or nothing
    /// for herd itself as root.
    pub(super) who: String,
}

/// Workers run as herd does when no `user` is set.
pub(super) fn herds_identity() -> Identity {
    let uid = nix::unistd::geteuid().as_raw();
    let groups = nix::unistd::getgroups()
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
        .unwrap_or_default();
    Identity {
        uid,
        gid: nix::unistd::getegid().as_raw(),
        groups: sorted(&groups),
        who: if uid == 0 {
            String::new()
        } else {
            format!(" by herd's user (uid {uid})")
        },
    }
}

/// What a process needs on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Search,
    Read,
    Execute,
}

impl Identity {
    /// The permission bits `meta` grants this identity for `access`, as the
    /// kernel decides (owner class, else group class, else others; root
    /// needs an execute bit on files only). ACLs and LSMs are not looked at.
    pub(super) fn may(&self, meta: &std::fs::Metadata, access: Access) -> bool {
        use std::os::unix::fs::MetadataExt;
        let bit = match access {
            Access::Read => 0o4,
            Access::Search | Access::Execute => 0o1,
        };
        let mode = meta.mode();
        if self.uid == 0 {
            return access != Access::Execute || mode & 0o111 != 0;
        }
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.binary_search(&meta.gid()).is_ok() {
            mode >> 3
        } else {
            mode
        };
        class & bit != 0
    }

    /// Every directory on the way to `path` (as written, and with symlinks
    /// resolved) can be searched.
    pub(super) fn can_reach(&self, path: &Path) -> Result<(), String> {
        let absolute = std::env::current_dir()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|_| path.to_owned());
        let resolved = std::fs::canonicalize(&absolute).ok();
        for way in std::iter::once(&absolute).chain(resolved.as_ref()) {
            for dir in way.ancestors().skip(1) {
                let Ok(meta) = std::fs::metadata(dir) else {
                    continue;
                };
                self.may_search(dir, &meta)?;
            }
        }
        Ok(())
    }

    /// `dir` (whose metadata is `meta`) can be searched by this identity.
    fn may_search(&self, dir: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
        if self.may(meta, Access::Search) {
            return Ok(());
        }
        Err(format!(
            "{} is not searchable{} ({})",
            dir.display(),
            self.who,
            describe(meta)
        ))
    }

    /// `path` can be opened for reading (the dynamic loader maps a preloaded
    /// library so): directories searchable, the file readable.
    pub(super) fn can_read(&self, path: &Path) -> Result<(), String> {
        self.can_reach(path)?;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if self.may(&meta, Access::Read) {
            return Ok(());
        }
        Err(format!(
            "{} is not readable{} ({})",
            path.display(),
            self.who,
            describe(&meta)
        ))
    }

    /// `dir` can be made the working directory: reached and searched.
    pub(super) fn can_enter(&self, dir: &Path) -> Result<(), String> {
        self.can_reach(dir)?;
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.may_search(dir, &meta)?;
        Ok(())
    }

    /// The kernel would `execve` `path` for this identity: directories
    /// searchable, the file executable, and a script also readable (its
    /// interpreter opens it) with an interpreter that can be run in turn.
    pub(super) fn can_execute(&self, path: &Path, depth: u32) -> Result<(), String> {
        self.can_reach(path)?;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if !self.may(&meta, Access::Execute) {
            return Err(format!(
                "{} is not executable{} ({})",
                path.display(),
                self.who,
                describe(&meta)
            ));
        }
        let Some(interpreter) = interpreter_of(path) else {
            return Ok(());
        };
        if !self.may(&meta, Access::Read) {
            return Err(format!(
                "{} is a script and not readable{} ({})",
                path.display(),
                self.who,
                describe(&meta)
            ));
        }
        // The kernel follows at most a few interpreters (binfmt_script).
        if depth < 4 {
            self.can_execute(&interpreter, depth + 1)
                .map_err(|e| format!("its interpreter: {e}"))?;
        }
        Ok(())
    }
}

/// In the OS-scheduled modes a worker starts as herd's own binary (the shim
/// that sets `LISTEN_PID`), reached through `/proc/self/exe`: only the
/// file's own permission bits count on that path.
pub(super) fn shim_runnable_by(user: &RunAs, mode: Mode) -> Result<(), ConfigError> {
    let refuse = |reason: String| invalid("user", format!("{:?}", user.name), reason);
    let herd = std::env::current_exe()
        .map_err(|e| refuse(format!("cannot find herd's own binary: {e}")))?;
    let meta = std::fs::metadata(&herd).map_err(|e| refuse(format!("{}: {e}", herd.display())))?;
    let identity = user.identity();
    if identity.may(&meta, Access::Execute) {
        return Ok(());
    }
    Err(refuse(format!(
        "in mode {} workers start through herd's own binary {}, which is not executable{} ({})",
        mode.name(),
        herd.display(),
        identity.who,
        describe(&meta)
    )))
}

/// `mode 0700, owner uid 0 gid 0`.
pub(super) fn describe(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "mode {:04o}, owner uid {} gid {}",
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid()
    )
}

/// The interpreter a `#!` line names, if `path` starts with one.
pub(super) fn interpreter_of(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.read(&mut head).ok()?;
    let line = head[..len].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let interpreter = String::from_utf8_lossy(line)
        .split_whitespace()
        .next()?
        .to_string();
    Some(PathBuf::from(interpreter))
}

/// `node` or `nodejs`, however it was found.
pub(super) fn is_node(program: &Path) -> bool {
    program
        .file_name()
        .is_some_and(|name| name == "node" || name == "nodejs")
}

/// Whether a command runs Node: `node app.js`, or `env [-S] [VAR=value...]
/// node app.js` (what a shebang `#!/usr/bin/env node` becomes, and how
/// people write it in a config).
pub fn names_node(command: &[String]) -> bool {
    let Some((program, args)) = command.split_first() else {
        return false;
    };
    if is_node(Path::new(program)) {
        return true;
    }
    let is_env = Path::new(program).file_name().is_some_and(|n| n == "env");
    is_env
        && args
            .iter()
            .find(|arg| !arg.starts_with('-') && !arg.contains('='))
            .is_some_and(|program| is_node(Path::new(program)))
}

/// Package runners that start the app as a child of their own Node
/// process: herd would supervise (and signal, and give its channel to) the
/// runner, not the app.
const PACKAGE_RUNNERS: &[&str] = &["npm", "npx", "yarn", "pnpm"];

/// Refuses a command that runs the app through a package runner, naming
/// what to run instead: package.json's `start` script (in `cwd`, else
/// herd's own directory) when there is one.
pub(super) fn not_a_package_runner(
    command: &[String],
    cwd: Option<&Path>,
) -> Result<(), ConfigError> {
    let Some(program) = command.first() else {
        return Ok(());
    };
    let name = Path::new(program).file_name().and_then(|n| n.to_str());
    let Some(runner) = name.filter(|n| PACKAGE_RUNNERS.contains(n)) else {
        return Ok(());
    };
    let manifest = cwd.unwrap_or(Path::new(".")).join("package.json");
    let start = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json["scripts"]["start"].as_str().map(str::to_string));
    let instead = match start {
        Some(start) => format!("package.json's start script is `{start}`: give that as the command, e.g. command = {:?}", start.split_whitespace().collect::<Vec<_>>()),
        None => "give the script itself, e.g. command = [\"node\", \"server.js\"]".to_string(),
    };
    Err(invalid(
        "command",
        format!("{command:?}"),
        format!("{runner} would start your app as a child of its own process, and herd would supervise, signal and give the cluster channel to {runner}, not the app: run the app directly; {instead}"),
    ))
}

/// Whether `script` is run by Node through its `#!` line: `#!/usr/bin/node`
/// or `#!/usr/bin/env node` (with `-S` and flags).
pub(super) fn runs_node_by_shebang(script: &Path) -> bool {
    let Some(interpreter) = interpreter_of(script) else {
        return false;
    };
    if is_node(&interpreter) {
        return true;
    }
    // `#!/usr/bin/env node`: what follows the interpreter on the line.
    shebang_words(script).is_some_and(|words| names_node(&words))
}

/// The words of a `#!` line, the interpreter first.
fn shebang_words(path: &Path) -> Option<Vec<String>> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let len = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..len].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    Some(
        String::from_utf8_lossy(line)
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// Finds the worker program the way a shell would and checks that the
/// workers' identity can run it.
pub(super) fn resolve_program(
    program: &str,
    cwd: Option<&Path>,
    identity: &Identity,
) -> Result<PathBuf, ConfigError> {
    let not_runnable = |reason: String| invalid("command", format!("{program:?}"), reason);
    let candidate = if program.contains('/') {
        let path = PathBuf::from(program);
        match cwd {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    } else {
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path_var)
            .map(|dir| dir.join(program))
            .find(|path| identity.can_execute(path, 0).is_ok())
            .ok_or_else(|| not_runnable(format!("not found in PATH{}", identity.who)))?
    };
    if let Err(e) = std::fs::metadata(&candidate) {
        return Err(not_runnable(format!("{}: {e}", candidate.display())));
    }
    identity.can_execute(&candidate, 0).map_err(not_runnable)?;
    Ok(candidate)
}
