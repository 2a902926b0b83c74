//! The rotation program itself, written with the assembler ([`super::asm`]).
//!
//! Owns what the program does with the five maps [`super::RotationProgram`]
//! creates: first, a connection from a source port herd reserved for a
//! readiness probe (`probes` map: port -> slot) goes to that slot's socket
//! in the `probe_sockets` map, whoever takes turns; every other one is
//! dealt: read the `config` map (how many sockets are dealt to, whose slot
//! each is, and whether by turns or by hash), pick one: the next turn from
//! the `tally` map's counter, or the connection's hash; select that socket
//! of the `sockets` map, and count the connection for its slot.
//!
//! In eBPF assembly (R1 is the `sk_reuseport_md` context, whose `data`
//! starts at the TCP header):
//!
//! ```text
//!     if data + 2 <= data_end:
//!         slot = lookup(probes, tcp.source)      (the port as the wire has it)
//!         if slot: sk_select_reuseport(ctx, probe_sockets, slot, 0); goto out
//!     config = lookup(config_map, 0); tally = lookup(tally_map, 0)
//!     live = config.live; if live == 0: goto out
//!     if config.hashed: pick = ctx.hash
//!     else:             pick = atomic_fetch_add(tally.next, 1)
//!     turn = pick % live
//!     if sk_select_reuseport(ctx, sockets, &turn, 0) != 0: goto out
//!     atomic_add(tally.dealt[config.slot_of[turn]], 1)
//! out: return SK_PASS   (nothing selected: the kernel's own hash picks)
//! ```
//!
//! Loaded to migrate (`BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, Linux 5.14),
//! the kernel also runs it when a socket of the group closes or is shut
//! down, once for each connection still queued there: the program deals it
//! like a new one, to a socket that takes turns (the closing one no longer
//! does), but does not count it again (`migrating_sk` is set): it was
//! counted when it arrived, for the slot first dealt it. With none
//! selected (nobody takes turns) the kernel moves it by its hash, instead
//! of resetting it.

// The `bpf(2)` calls are in `super`; nothing here needs `unsafe`.
#![deny(unsafe_code)]

use std::os::fd::RawFd;

use super::asm::{Alu, Asm, Atomic, Cond, Helper, Insn, Reg, Size};
use super::{CONFIG_HASHED, MAX_ROTATION};

/// Where every failed check goes: pass, selecting nothing.
const OUT: &str = "out";
/// Where a connection that is not a probe is dealt.
const DEAL: &str = "deal";
/// The probe's key (its source port) on the stack.
const PORT_KEY: i16 = -12;
/// Where `struct sk_reuseport_md` keeps `data` and `data_end`.
const DATA: i16 = 0;
const DATA_END: i16 = 8;
/// Where the turn is taken from the pick (a counter or the hash).
const PICK: &str = "pick";
const BY_HASH: &str = "by_hash";
/// The context, kept past the calls that clobber R1.
const SAVED_CTX: Reg = Reg::R6;
/// The `config` map's value: `live: u32`, `slot_of: [u32; MAX_ROTATION]`,
/// then `hashed: u32`.
const CONFIG: Reg = Reg::R7;
/// The `tally` map's value: `next: u64`, then `dealt: [u64; MAX_ROTATION]`.
const TALLY: Reg = Reg::R8;
/// `live`, until the turn is taken; then the turn (one register for both).
const LIVE: Reg = Reg::R9;
const TURN: Reg = Reg::R9;
/// Stack slots below the frame pointer: the maps' one key (0), and the
/// turn, as the key into `sockets`.
const KEY: i16 = -4;
const TURN_KEY: i16 = -8;
/// `SK_PASS`: let the connection in (to the selected socket, if any).
const SK_PASS: i32 = 1;
/// Where `struct sk_reuseport_md` keeps `hash` (after two data pointers
/// and four u32s).
const HASH: i16 = 32;
/// Where it keeps `migrating_sk` (after `hash`, padding and `sk`); only a
/// program loaded to migrate may read it.
const MIGRATING_SK: i16 = 48;

/// The program, with the maps' file descriptors in its `ld_imm64`s. The
/// same code loads as `BPF_SK_REUSEPORT_SELECT` or, to migrate, as
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`.
pub(super) fn rotation(maps: &Maps, migrates: bool) -> Vec<Insn> {
    let Maps {
        sockets,
        config,
        tally,
        probes,
        probe_sockets,
    } = *maps;
    // The turn and the slot are checked against MAX_ROTATION for the
    // verifier, which cannot know that `live` and every slot are below it.
    let max = MAX_ROTATION as i32;
    let hashed = i16::try_from(CONFIG_HASHED).expect("the config value is under 32 KiB");
    let mut asm = Asm::new();
    asm.mov64(SAVED_CTX, Reg::CTX);
    steer_probes(&mut asm, probes, probe_sockets);
    // The key 0, for both lookups.
    asm.label(DEAL).store(Size::W, Reg::FRAME, KEY, 0);
    lookup_or_out(&mut asm, config, CONFIG);
    lookup_or_out(&mut asm, tally, TALLY);
    // R2 = the pick: tally.next++, or the connection's hash.
    asm.load(Size::W, LIVE, CONFIG, 0)
        .jump_if(Cond::Eq, LIVE, 0, OUT)
        .load(Size::W, Reg::R2, CONFIG, hashed)
        .jump_if(Cond::Ne, Reg::R2, 0, BY_HASH)
        .mov64(Reg::R2, 1)
        .atomic(Atomic::FetchAdd, Size::Dw, TALLY, 0, Reg::R2)
        .jump(PICK);
    asm.label(BY_HASH).load(Size::W, Reg::R2, SAVED_CTX, HASH);
    // TURN = R2 % live, also at TURN_KEY.
    asm.label(PICK)
        .alu32(Alu::Mod, Reg::R2, LIVE)
        .jump_if(Cond::Ge, Reg::R2, max, OUT)
        .store(Size::W, Reg::FRAME, TURN_KEY, Reg::R2)
        .mov64(TURN, Reg::R2);
    // sk_select_reuseport(ctx, sockets, &turn, 0)
    asm.mov64(Reg::R1, SAVED_CTX)
        .load_map_fd(Reg::R2, sockets)
        .mov64(Reg::R3, Reg::FRAME)
        .alu64(Alu::Add, Reg::R3, i32::from(TURN_KEY))
        .mov64(Reg::R4, 0)
        .call(Helper::SkSelectReuseport)
        .jump_if(Cond::Ne, Reg::RET, 0, OUT);
    if migrates {
        // A connection moved off a closing socket was counted on arrival.
        asm.load(Size::Dw, Reg::R1, SAVED_CTX, MIGRATING_SK)
            .jump_if(Cond::Ne, Reg::R1, 0, OUT);
    }
    // TURN = &config.slot_of[turn] - 4; R1 = the slot.
    asm.alu64(Alu::Lsh, TURN, 2)
        .alu64(Alu::Add, TURN, CONFIG)
        .load(Size::W, Reg::R1, TURN, 4)
        .jump_if(Cond::Ge, Reg::R1, max, OUT);
    // R1 = &tally.dealt[slot] - 8; count one.
    asm.alu64(Alu::Lsh, Reg::R1, 3)
        .alu64(Alu::Add, Reg::R1, TALLY)
        .mov64(Reg::R2, 1)
        .atomic(Atomic::Add, Size::Dw, Reg::R1, 8, Reg::R2);
    asm.label(OUT).mov64(Reg::RET, SK_PASS).exit();
    asm.finish()
        .expect("the rotation program assembles (its unit tests say so)")
}

/// The maps' file descriptors, for the program's `ld_imm64`s.
#[derive(Debug, Clone, Copy)]
pub(super) struct Maps {
    pub sockets: RawFd,
    pub config: RawFd,
    pub tally: RawFd,
    pub probes: RawFd,
    pub probe_sockets: RawFd,
}

/// A probe (its source port is in `probes`) goes to its slot's socket in
/// `probe_sockets`; anything else, or a packet too short to read the port
/// from, goes on to `deal`.
fn steer_probes(asm: &mut Asm, probes: RawFd, probe_sockets: RawFd) {
    // R2 = data, R3 = data_end; the verifier wants the bound checked.
    asm.load(Size::Dw, Reg::R2, SAVED_CTX, DATA)
        .load(Size::Dw, Reg::R3, SAVED_CTX, DATA_END)
        .mov64(Reg::R4, Reg::R2)
        .alu64(Alu::Add, Reg::R4, 2)
        .jump_if(Cond::Gt, Reg::R4, Reg::R3, DEAL)
        .load(Size::H, Reg::R5, Reg::R2, 0)
        .store(Size::W, Reg::FRAME, PORT_KEY, Reg::R5);
    // R0 = lookup(probes, &port): the slot, or NULL.
    asm.mov64(Reg::R2, Reg::FRAME)
        .alu64(Alu::Add, Reg::R2, i32::from(PORT_KEY))
        .load_map_fd(Reg::R1, probes)
        .call(Helper::MapLookupElem)
        .jump_if(Cond::Eq, Reg::RET, 0, DEAL);
    // sk_select_reuseport(ctx, probe_sockets, slot, 0), whatever it says.
    asm.mov64(Reg::R3, Reg::RET)
        .mov64(Reg::R1, SAVED_CTX)
        .load_map_fd(Reg::R2, probe_sockets)
        .mov64(Reg::R4, 0)
        .call(Helper::SkSelectReuseport)
        .jump(OUT);
}

/// `into = lookup(map, &KEY)`, or to `out` where the map has no value.
fn lookup_or_out(asm: &mut Asm, map: RawFd, into: Reg) {
    asm.mov64(Reg::R2, Reg::FRAME)
        .alu64(Alu::Add, Reg::R2, i32::from(KEY))
        .load_map_fd(Reg::R1, map)
        .call(Helper::MapLookupElem)
        .jump_if(Cond::Eq, Reg::RET, 0, OUT)
        .mov64(into, Reg::RET);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation program's bytes with map fds 0x11 (sockets), 0x22
    /// (config), 0x33 (tally), 0x44 (probes) and 0x55 (probe_sockets), one
    /// row per instruction slot: what the
    /// kernel verified and ran in `super`'s tests (turns, hash, migration)
    /// when these were pinned. An edit of the program changes them on
    /// purpose, after those tests pass on a kernel.
    const ROTATION_BYTES: [[u8; 8]; 66] = [
        [0xbf, 0x16, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 0
        [0x79, 0x62, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 1
        [0x79, 0x63, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00], // 2
        [0xbf, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 3
        [0x07, 0x04, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00], // 4
        [0x2d, 0x34, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00], // 5
        [0x69, 0x25, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 6
        [0x63, 0x5a, 0xf4, 0xff, 0x00, 0x00, 0x00, 0x00], // 7
        [0xbf, 0xa2, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 8
        [0x07, 0x02, 0x00, 0x00, 0xf4, 0xff, 0xff, 0xff], // 9
        [0x18, 0x11, 0x00, 0x00, 0x44, 0x00, 0x00, 0x00], // 10
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 11
        [0x85, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 12
        [0x15, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00], // 13
        [0xbf, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 14
        [0xbf, 0x61, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 15
        [0x18, 0x12, 0x00, 0x00, 0x55, 0x00, 0x00, 0x00], // 16
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 17
        [0xb7, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 18
        [0x85, 0x00, 0x00, 0x00, 0x52, 0x00, 0x00, 0x00], // 19
        [0x05, 0x00, 0x2b, 0x00, 0x00, 0x00, 0x00, 0x00], // 20
        [0x62, 0x0a, 0xfc, 0xff, 0x00, 0x00, 0x00, 0x00], // 21
        [0xbf, 0xa2, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 22
        [0x07, 0x02, 0x00, 0x00, 0xfc, 0xff, 0xff, 0xff], // 23
        [0x18, 0x11, 0x00, 0x00, 0x22, 0x00, 0x00, 0x00], // 24
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 25
        [0x85, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 26
        [0x15, 0x00, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00], // 27
        [0xbf, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 28
        [0xbf, 0xa2, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 29
        [0x07, 0x02, 0x00, 0x00, 0xfc, 0xff, 0xff, 0xff], // 30
        [0x18, 0x11, 0x00, 0x00, 0x33, 0x00, 0x00, 0x00], // 31
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 32
        [0x85, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 33
        [0x15, 0x00, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x00], // 34
        [0xbf, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 35
        [0x61, 0x79, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 36
        [0x15, 0x09, 0x1a, 0x00, 0x00, 0x00, 0x00, 0x00], // 37
        [0x61, 0x72, 0x04, 0x10, 0x00, 0x00, 0x00, 0x00], // 38
        [0x55, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00], // 39
        [0xb7, 0x02, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 40
        [0xdb, 0x28, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 41
        [0x05, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00], // 42
        [0x61, 0x62, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00], // 43
        [0x9c, 0x92, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 44
        [0x35, 0x02, 0x12, 0x00, 0x00, 0x04, 0x00, 0x00], // 45
        [0x63, 0x2a, 0xf8, 0xff, 0x00, 0x00, 0x00, 0x00], // 46
        [0xbf, 0x29, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 47
        [0xbf, 0x61, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 48
        [0x18, 0x12, 0x00, 0x00, 0x11, 0x00, 0x00, 0x00], // 49
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 50
        [0xbf, 0xa3, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 51
        [0x07, 0x03, 0x00, 0x00, 0xf8, 0xff, 0xff, 0xff], // 52
        [0xb7, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 53
        [0x85, 0x00, 0x00, 0x00, 0x52, 0x00, 0x00, 0x00], // 54
        [0x55, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00], // 55
        [0x67, 0x09, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00], // 56
        [0x0f, 0x79, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 57
        [0x61, 0x91, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00], // 58
        [0x35, 0x01, 0x04, 0x00, 0x00, 0x04, 0x00, 0x00], // 59
        [0x67, 0x01, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00], // 60
        [0x0f, 0x81, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 61
        [0xb7, 0x02, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 62
        [0xdb, 0x21, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00], // 63
        [0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00], // 64
        [0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // 65
    ];

    fn bytes() -> Vec<[u8; 8]> {
        bytes_of(false)
    }

    fn bytes_of(migrates: bool) -> Vec<[u8; 8]> {
        let maps = Maps {
            sockets: 0x11,
            config: 0x22,
            tally: 0x33,
            probes: 0x44,
            probe_sockets: 0x55,
        };
        rotation(&maps, migrates)
            .into_iter()
            .map(Insn::to_bytes)
            .collect()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn the_rotation_program_encodes_to_the_bytes_the_kernel_verified() {
        assert_eq!(bytes(), ROTATION_BYTES);
    }

    /// The migrating program is the same but for two instructions before
    /// the count: load `migrating_sk` (r1 = *(u64 *)(r6 + 48)) and, if
    /// set, jump to `r0 = SK_PASS` without counting.
    #[cfg(target_endian = "little")]
    #[test]
    fn the_migrating_program_does_not_count_a_moved_connection_again() {
        let plain = bytes();
        let migrating = bytes_of(true);
        assert_eq!(migrating.len(), plain.len() + 2);
        let at = migrating
            .iter()
            .position(|insn| *insn == [0x79, 0x61, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00])
            .expect("the load of migrating_sk");
        assert_eq!(migrating[at + 1][..2], [0x55, 0x01]);
        // After them, the same instructions (the jumps before them reach
        // two slots further, to the same `out`).
        assert_eq!(migrating[at + 2..], plain[at..]);
    }

    /// Read from the bytes, not from the assembler: every jump lands on
    /// the first slot of an instruction inside the program, and the last
    /// instruction is `exit`.
    #[test]
    fn every_jump_lands_on_an_instruction_and_the_program_ends_in_exit() {
        const LD_IMM64: u8 = 0x18;
        const CALL: u8 = 0x85;
        const EXIT: u8 = 0x95;
        let code = bytes();
        // Slots an instruction starts at: not the second half of an ld_imm64.
        let mut starts = vec![true; code.len()];
        for at in 0..code.len() {
            if starts[at] && code[at][0] == LD_IMM64 {
                assert!(at + 1 < code.len(), "ld_imm64 cut short at {at}");
                starts[at + 1] = false;
            }
        }
        let mut jumps = 0;
        for (at, insn) in code.iter().enumerate().filter(|&(at, _)| starts[at]) {
            let class = insn[0] & 0x07;
            let is_jump = (class == 0x05 || class == 0x06) && ![CALL, EXIT].contains(&insn[0]);
            if is_jump {
                let off = i16::from_ne_bytes([insn[2], insn[3]]);
                let target = at as i64 + 1 + i64::from(off);
                let lands = usize::try_from(target)
                    .is_ok_and(|target| target < code.len() && starts[target]);
                assert!(lands, "the jump at {at} lands at {target}");
                jumps += 1;
            }
        }
        assert!(jumps > 0, "found no jump: the decoding above is wrong");
        assert_eq!(code.last().map(|insn| insn[0]), Some(EXIT));
    }
}
