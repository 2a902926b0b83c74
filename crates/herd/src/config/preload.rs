//! `protocol = "preload"`: what must hold before herd starts a program
//! with its preload library, checked by `resolve` (so `herd check` refuses
//! what `herd run` would): the library is there, and the program is one
//! the dynamic loader will load it into.
//!
//! The loader ignores `LD_PRELOAD` for a program it does not run: a
//! statically linked one (no `PT_INTERP` program header, most Go binaries
//! among them) or a set-id one (secure execution). A Go program linked
//! dynamically still makes its network calls without libc, so it is known
//! by its `.go.buildinfo` section and refused too. A `#!` script is judged
//! by its interpreter (`/usr/bin/env python3`: python3, found in PATH).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::users::Identity;
use super::{invalid, ConfigError};

/// The library's file name, as cargo builds it.
pub const LIBRARY_NAME: &str = "libherd_preload.so";

/// Environment variable naming the library, ahead of where herd looks.
pub const LIBRARY_ENV: &str = "HERD_PRELOAD_LIBRARY";

/// What to use instead, for a program the library cannot reach.
const ALTERNATIVES: &str = "run it with a socket herd passes instead, if it takes one (systemd's LISTEN_FDS, e.g. Go's coreos/go-systemd activation): mode \"shared\", mode \"reuseport\", or round-robin with rotation \"kernel\"";

/// The library to preload: `HERD_PRELOAD_LIBRARY`, else beside herd's own
/// executable (where `cargo build` puts both), else `../lib/herd/`.
pub fn library() -> Result<PathBuf, ConfigError> {
    let candidates: Vec<PathBuf> = match std::env::var_os(LIBRARY_ENV) {
        Some(path) => vec![PathBuf::from(path)],
        None => {
            let exe = std::env::current_exe().map_err(|e| {
                refuse_library(format!(
                    "cannot find herd's own executable to look beside it for {LIBRARY_NAME}: {e}"
                ))
            })?;
            let dir = exe.parent().unwrap_or(Path::new("/"));
            vec![
                dir.join(LIBRARY_NAME),
                dir.join("../lib/herd").join(LIBRARY_NAME),
            ]
        }
    };
    first_usable(&candidates)
}

fn refuse_library(why: String) -> ConfigError {
    invalid("protocol", "\"preload\"", why)
}

/// The first of `candidates` that is a file, canonical, and fit for
/// `LD_PRELOAD` (a list separated by spaces and colons).
fn first_usable(candidates: &[PathBuf]) -> Result<PathBuf, ConfigError> {
    let Some(found) = candidates.iter().find(|path| path.is_file()) else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(refuse_library(format!(
            "herd's preload library is not at {}: build it with `cargo build --release` (it is crates/herd-preload), or name it in {LIBRARY_ENV}",
            tried.join(" or ")
        )));
    };
    let found = found.canonicalize().unwrap_or_else(|_| found.clone());
    let text = found.display().to_string();
    if text.contains([' ', ':']) {
        return Err(refuse_library(format!("the library's path {text:?} holds a space or a colon, which LD_PRELOAD cannot carry: move it, or name another in {LIBRARY_ENV}")));
    }
    Ok(found)
}

/// The library the workers preload, for `program` run as `identity`:
/// refused when the loader would not preload into the program, or the
/// workers cannot read the library (the loader would say "cannot be
/// preloaded ... ignored", and the program bind the port herd holds).
pub(super) fn for_workers(program: &Path, identity: &Identity) -> Result<PathBuf, ConfigError> {
    check_program(program)?;
    let library = library()?;
    identity.can_read(&library).map_err(|why| {
        invalid(
            "protocol",
            "\"preload\"",
            format!("the workers cannot load herd's preload library: {why}"),
        )
    })?;
    Ok(library)
}

/// Refuses a program the dynamic loader would not preload into.
pub fn check_program(program: &Path) -> Result<(), ConfigError> {
    let refuse = |why: String| {
        invalid(
            "protocol",
            "\"preload\"",
            format!("{}: {why}; {ALTERNATIVES}", program.display()),
        )
    };
    let target = match interpreter_of(program) {
        Some(interpreter) => interpreter,
        None => program.to_path_buf(),
    };
    let meta =
        std::fs::metadata(&target).map_err(|e| refuse(format!("{}: {e}", target.display())))?;
    if meta.permissions().mode() & 0o6000 != 0 {
        return Err(refuse(format!(
            "{} is set-user-ID or set-group-ID, and the loader ignores LD_PRELOAD for it",
            target.display()
        )));
    }
    let bytes = std::fs::read(&target).map_err(|e| refuse(format!("{}: {e}", target.display())))?;
    match linkage(&bytes) {
        Linkage::Dynamic => Ok(()),
        Linkage::NotElf => Err(refuse(format!("{} is neither an ELF executable nor a #! script", target.display()))),
        Linkage::Static => Err(refuse(format!(
            "{} is statically linked (no ELF interpreter), so no library can be preloaded into it",
            target.display()
        ))),
        Linkage::Go => Err(refuse(format!(
            "{} is a Go program, which makes its system calls without libc, so the library never sees its bind()",
            target.display()
        ))),
    }
}

/// A `#!` script's interpreter, with `env`'s program found in PATH.
fn interpreter_of(script: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let len = std::fs::File::open(script).ok()?.read(&mut head).ok()?;
    let line = head[..len].strip_prefix(b"#!")?;
    let line = String::from_utf8_lossy(line.split(|&b| b == b'\n').next()?).to_string();
    let mut words = line.split_whitespace();
    let interpreter = PathBuf::from(words.next()?);
    if interpreter.file_name().is_some_and(|name| name == "env") {
        let program = words.find(|word| !word.starts_with('-'))?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        return std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file());
    }
    Some(interpreter)
}

/// How an executable is linked, as far as preloading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linkage {
    /// Has an ELF interpreter, and is not Go: the loader preloads.
    Dynamic,
    /// No `PT_INTERP`: nothing is preloaded.
    Static,
    /// Go (a `.go.buildinfo` section): its syscalls bypass libc.
    Go,
    NotElf,
}

const PT_INTERP: u32 = 3;

/// Reads just enough of a 64- or 32-bit little-endian ELF file: its
/// program headers for `PT_INTERP`, its section names for Go's.
pub fn linkage(bytes: &[u8]) -> Linkage {
    let Some(elf) = Elf::parse(bytes) else {
        return Linkage::NotElf;
    };
    if elf.has_section(".go.buildinfo") {
        return Linkage::Go;
    }
    let interp =
        (0..elf.phnum).any(|i| elf.u32_at(elf.phoff + i * elf.phentsize) == Some(PT_INTERP));
    if interp {
        Linkage::Dynamic
    } else {
        Linkage::Static
    }
}

/// The header fields [`linkage`] reads.
struct Elf<'a> {
    bytes: &'a [u8],
    wide: bool,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Elf<'a>> {
        if bytes.get(..4)? != b"\x7fELF" || bytes.get(5) != Some(&1) {
            return None;
        }
        let wide = match bytes.get(4)? {
            2 => true,
            1 => false,
            _ => return None,
        };
        let mut elf = Elf {
            bytes,
            wide,
            phoff: 0,
            phentsize: 0,
            phnum: 0,
            shoff: 0,
            shentsize: 0,
            shnum: 0,
            shstrndx: 0,
        };
        // e_phoff/e_shoff are words; the 16-bit counts follow e_flags.
        let (phoff, shoff, counts) = if wide {
            (0x20, 0x28, 0x36)
        } else {
            (0x1c, 0x20, 0x2a)
        };
        elf.phoff = elf.word_at(phoff)?;
        elf.shoff = elf.word_at(shoff)?;
        elf.phentsize = elf.u16_at(counts)?;
        elf.phnum = elf.u16_at(counts + 2)?;
        elf.shentsize = elf.u16_at(counts + 4)?;
        elf.shnum = elf.u16_at(counts + 6)?;
        elf.shstrndx = elf.u16_at(counts + 8)?;
        Some(elf)
    }

    fn u16_at(&self, at: usize) -> Option<usize> {
        let b = self.bytes.get(at..at + 2)?;
        Some(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn word_at(&self, at: usize) -> Option<usize> {
        if !self.wide {
            return self.u32_at(at).map(|w| w as usize);
        }
        let b: [u8; 8] = self.bytes.get(at..at + 8)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(b)).ok()
    }

    /// Whether a section is named `name` (section names live in the
    /// string table section `e_shstrndx` names).
    fn has_section(&self, name: &str) -> bool {
        // sh_offset sits after sh_name, sh_type and sh_flags (a word).
        let offset_field = if self.wide { 0x18 } else { 0x10 };
        let header = |i: usize| self.shoff + i * self.shentsize;
        let Some(strings) = self.word_at(header(self.shstrndx) + offset_field) else {
            return false;
        };
        (0..self.shnum).any(|i| {
            let Some(start) = self.u32_at(header(i)).map(|n| strings + n as usize) else {
                return false;
            };
            self.bytes
                .get(start..)
                .and_then(|rest| rest.split(|&b| b == 0).next())
                .is_some_and(|found| found == name.as_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linkage_of(path: &str) -> Linkage {
        linkage(&std::fs::read(path).unwrap())
    }

    #[test]
    fn this_machines_programs_are_told_apart() {
        // Debian's own binaries are dynamic; the test binary is too.
        assert_eq!(linkage_of("/bin/sh"), Linkage::Dynamic);
        assert_eq!(
            linkage(&std::fs::read(std::env::current_exe().unwrap()).unwrap()),
            Linkage::Dynamic
        );
        assert_eq!(linkage(b"#!/bin/sh\n"), Linkage::NotElf);
        assert_eq!(linkage(b"\x7fELF"), Linkage::NotElf);
        assert_eq!(linkage(b""), Linkage::NotElf);
    }

    #[test]
    fn a_static_header_has_no_interpreter() {
        // A minimal 64-bit ELF header with one PT_LOAD program header.
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20] = 0x40; // e_phoff
        elf[0x36] = 0x38; // e_phentsize
        elf[0x38] = 1; // e_phnum
        elf[0x40] = 1; // p_type PT_LOAD
        assert_eq!(linkage(&elf), Linkage::Static);
        elf[0x40] = 3; // PT_INTERP
        assert_eq!(linkage(&elf), Linkage::Dynamic);
        // Truncated headers are not read past the end.
        assert_eq!(linkage(&elf[..0x40]), Linkage::Static);
    }

    #[test]
    fn the_library_is_the_first_usable_candidate() {
        let dir = std::env::temp_dir().join(format!("herd-preload-lib-{}", std::process::id()));
        let spaced = dir.join("with space");
        std::fs::create_dir_all(&spaced).unwrap();
        let (good, odd) = (dir.join(LIBRARY_NAME), spaced.join(LIBRARY_NAME));
        std::fs::write(&good, "").unwrap();
        std::fs::write(&odd, "").unwrap();
        let missing = dir.join("missing.so");
        let found = first_usable(&[missing.clone(), good.clone()]).unwrap();
        assert_eq!(found, good.canonicalize().unwrap());
        let refused = first_usable(std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("missing.so") && refused.contains(LIBRARY_ENV),
            "{refused}"
        );
        let refused = first_usable(&[odd]).unwrap_err().to_string();
        assert!(refused.contains("space or a colon"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_script_is_judged_by_its_interpreter() {
        let dir = std::env::temp_dir().join(format!("herd-preload-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("server.sh");
        std::fs::write(&script, "#!/usr/bin/env sh\necho hi\n").unwrap();
        assert!(interpreter_of(&script).is_some_and(|p| p.ends_with("sh")));
        assert!(check_program(&script).is_ok());
        std::fs::write(&script, "#!/bin/sh -e\n").unwrap();
        assert_eq!(interpreter_of(&script), Some(PathBuf::from("/bin/sh")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
