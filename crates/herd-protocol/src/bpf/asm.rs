//! A small eBPF assembler: named registers, typed instructions, and jumps
//! to labels whose offsets are worked out when the program is finished.
//!
//! Owns the encoding of `struct bpf_insn` (opcode, registers, offset,
//! immediate; `<linux/bpf.h>`, `Documentation/bpf/standardization`) and the
//! jump offsets: a jump names a label, [`Asm::finish`] counts the
//! instruction slots to it and refuses a label that is missing, defined
//! twice, past the last instruction or too far for an `i16`. So an edit of
//! the program (an instruction more, a test moved) cannot leave a jump
//! pointing at the wrong instruction, or into the middle of a 16-byte
//! `ld_imm64`, whose two slots are always emitted together.
//!
//! It covers what herd's programs use; a new program may need another
//! [`Alu`] op, [`Cond`] or [`Helper`], each one line here.

// The `bpf(2)` calls are in `super`; nothing here needs `unsafe`.
#![deny(unsafe_code)]

use std::collections::HashMap;

/// The registers. R0 holds a helper's result and the program's; R1-R5 are
/// a helper's arguments (and clobbered by a call); R6-R9 survive calls;
/// R10 is the read-only frame pointer.
#[allow(dead_code, reason = "the whole register file, used or not")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
}

impl Reg {
    /// What a helper and the program return.
    pub const RET: Reg = Reg::R0;
    /// The program's context, on entry (clobbered by the first call).
    pub const CTX: Reg = Reg::R1;
    /// The frame pointer: the stack is below it.
    pub const FRAME: Reg = Reg::R10;
}

/// An operand: a register, or a 32-bit immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Reg(Reg),
    Imm(i32),
}

impl From<Reg> for Src {
    fn from(reg: Reg) -> Self {
        Src::Reg(reg)
    }
}

impl From<i32> for Src {
    fn from(imm: i32) -> Self {
        Src::Imm(imm)
    }
}

/// Arithmetic: `dst op= src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    Add = 0x00,
    Lsh = 0x60,
    Mod = 0x90,
}

/// Conditions of a jump, comparing `dst` with `src` (unsigned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ge = 0x30,
    Ne = 0x50,
}

/// The width of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 4 bytes.
    W = 0x00,
    /// 2 bytes.
    H = 0x08,
    /// 8 bytes.
    Dw = 0x18,
}

/// Atomic read-modify-write operations on memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Atomic {
    /// `*(dst + off) += src`.
    Add = 0x00,
    /// `src = *(dst + off); *(dst + off) += src`, as one step.
    FetchAdd = 0x01,
}

/// Kernel helpers, by their number in `enum bpf_func_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Helper {
    /// `void *bpf_map_lookup_elem(map, key)`: the value, or NULL.
    MapLookupElem = 1,
    /// `long bpf_sk_select_reuseport(reuse, map, key, flags)`: 0 if chosen.
    SkSelectReuseport = 82,
}

// Instruction classes, sources and modes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU32: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const SRC_IMM: u8 = 0x00;
const SRC_REG: u8 = 0x08;
const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const MODE_ATOMIC: u8 = 0xc0;
const OP_MOV: u8 = 0xb0;
const OP_JA: u8 = 0x00;
const OP_CALL: u8 = 0x80;
const OP_EXIT: u8 = 0x90;
/// `ld_imm64`'s source register when its immediate is a map's fd.
const PSEUDO_MAP_FD: u8 = 1;

/// One instruction slot, laid out as `struct bpf_insn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg and src_reg, 4 bits each, in the bitfield order of the target.
    regs: u8,
    off: i16,
    imm: i32,
}

// The kernel reads the program as an array of 8-byte `bpf_insn`.
const _: () = assert!(size_of::<Insn>() == 8);

impl Insn {
    fn new(code: u8, dst: Reg, src: u8, off: i16, imm: i32) -> Self {
        let dst = dst as u8;
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Insn {
            code,
            regs,
            off,
            imm,
        }
    }

    /// The slot's 8 bytes, as the kernel reads them on this machine (the
    /// kernel is passed the `Insn`s themselves; tests compare bytes).
    #[cfg(test)]
    pub fn to_bytes(self) -> [u8; 8] {
        let [off0, off1] = self.off.to_ne_bytes();
        let [imm0, imm1, imm2, imm3] = self.imm.to_ne_bytes();
        [self.code, self.regs, off0, off1, imm0, imm1, imm2, imm3]
    }
}

/// What [`Asm::finish`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    #[error("the jump at instruction {at} names `{label}`, which is never defined")]
    UndefinedLabel { label: &'static str, at: usize },
    #[error("label `{label}` is defined twice (at instructions {first} and {second})")]
    DuplicateLabel {
        label: &'static str,
        first: usize,
        second: usize,
    },
    #[error("label `{label}` is past the last instruction, where a jump cannot land")]
    LabelPastEnd { label: &'static str },
    #[error("the jump at instruction {at} to `{label}` is {offset} slots away, beyond an i16")]
    OffsetOutOfRange {
        label: &'static str,
        at: usize,
        offset: i64,
    },
}

/// A program being written: instructions in order, labels between them.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<Insn>,
    /// Label -> the slot it stands before.
    labels: HashMap<&'static str, usize>,
    /// Jumps waiting for their offset: the jump's slot and its label.
    jumps: Vec<(usize, &'static str)>,
    /// The first label defined twice, reported by `finish`.
    duplicate: Option<AsmError>,
}

impl Asm {
    pub fn new() -> Self {
        Asm::default()
    }

    /// Names the next instruction, as a jump target.
    pub fn label(&mut self, label: &'static str) -> &mut Self {
        let here = self.code.len();
        if let Some(&first) = self.labels.get(label) {
            self.duplicate.get_or_insert(AsmError::DuplicateLabel {
                label,
                first,
                second: here,
            });
        } else {
            self.labels.insert(label, here);
        }
        self
    }

    fn push(&mut self, insn: Insn) -> &mut Self {
        self.code.push(insn);
        self
    }

    /// `dst = src` (64 bits).
    pub fn mov64(&mut self, dst: Reg, src: impl Into<Src>) -> &mut Self {
        self.alu(ALU64, OP_MOV, dst, src.into())
    }

    /// `dst op= src` (64 bits).
    pub fn alu64(&mut self, op: Alu, dst: Reg, src: impl Into<Src>) -> &mut Self {
        self.alu(ALU64, op as u8, dst, src.into())
    }

    /// `dst op= src` on the low 32 bits; the upper 32 become zero.
    pub fn alu32(&mut self, op: Alu, dst: Reg, src: impl Into<Src>) -> &mut Self {
        self.alu(ALU32, op as u8, dst, src.into())
    }

    fn alu(&mut self, class: u8, op: u8, dst: Reg, src: Src) -> &mut Self {
        self.push(match src {
            Src::Reg(src) => Insn::new(class | op | SRC_REG, dst, src as u8, 0, 0),
            Src::Imm(imm) => Insn::new(class | op | SRC_IMM, dst, 0, 0, imm),
        })
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(Insn::new(
            LDX | size as u8 | MODE_MEM,
            dst,
            src as u8,
            off,
            0,
        ))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: impl Into<Src>) -> &mut Self {
        self.push(match src.into() {
            Src::Reg(src) => Insn::new(STX | size as u8 | MODE_MEM, dst, src as u8, off, 0),
            Src::Imm(imm) => Insn::new(ST | size as u8 | MODE_MEM, dst, 0, off, imm),
        })
    }

    /// `op` on `*(size *)(dst + off)` with `src`, atomically.
    pub fn atomic(&mut self, op: Atomic, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        let code = STX | size as u8 | MODE_ATOMIC;
        self.push(Insn::new(code, dst, src as u8, off, op as i32))
    }

    /// `dst = map` (an `ld_imm64`, two slots): the kernel puts the map
    /// behind file descriptor `map` there when it loads the program.
    pub fn load_map_fd(&mut self, dst: Reg, map: i32) -> &mut Self {
        let code = LD | Size::Dw as u8 | MODE_IMM;
        self.push(Insn::new(code, dst, PSEUDO_MAP_FD, 0, map));
        self.push(Insn::new(0, Reg::R0, 0, 0, 0))
    }

    /// `if dst cond src: goto label`.
    pub fn jump_if(
        &mut self,
        cond: Cond,
        dst: Reg,
        src: impl Into<Src>,
        label: &'static str,
    ) -> &mut Self {
        self.jumps.push((self.code.len(), label));
        self.alu(JMP, cond as u8, dst, src.into())
    }

    /// `goto label`.
    pub fn jump(&mut self, label: &'static str) -> &mut Self {
        self.jumps.push((self.code.len(), label));
        self.push(Insn::new(JMP | OP_JA, Reg::R0, 0, 0, 0))
    }

    /// `R0 = helper(R1, ..., R5)`.
    pub fn call(&mut self, helper: Helper) -> &mut Self {
        self.push(Insn::new(JMP | OP_CALL, Reg::R0, 0, 0, helper as i32))
    }

    /// `return R0`.
    pub fn exit(&mut self) -> &mut Self {
        self.push(Insn::new(JMP | OP_EXIT, Reg::R0, 0, 0, 0))
    }

    /// The program, every jump's offset filled in.
    pub fn finish(mut self) -> Result<Vec<Insn>, AsmError> {
        if let Some(duplicate) = self.duplicate {
            return Err(duplicate);
        }
        let end = self.code.len();
        for &(at, label) in &self.jumps {
            let &target = self
                .labels
                .get(label)
                .ok_or(AsmError::UndefinedLabel { label, at })?;
            if target == end {
                return Err(AsmError::LabelPastEnd { label });
            }
            // An offset counts slots from the one after the jump.
            let offset = target as i64 - at as i64 - 1;
            self.code[at].off = i16::try_from(offset).map_err(|_| AsmError::OffsetOutOfRange {
                label,
                at,
                offset,
            })?;
        }
        Ok(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_forward_and_back_count_slots_from_the_next_one() {
        let mut asm = Asm::new();
        asm.label("top")
            .jump_if(Cond::Eq, Reg::R1, 0, "out")
            .load_map_fd(Reg::R2, 7)
            .jump_if(Cond::Ne, Reg::R1, Reg::R2, "top")
            .label("out")
            .exit();
        let code = asm.finish().unwrap();
        assert_eq!(code.len(), 5);
        // 0 -> 4 skips the jump back and both slots of the ld_imm64.
        assert_eq!(code[0].off, 3);
        assert_eq!(code[3].off, -4);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn instructions_encode_as_struct_bpf_insn() {
        let mut asm = Asm::new();
        asm.mov64(Reg::R6, Reg::CTX)
            .alu64(Alu::Add, Reg::R2, -4)
            .alu32(Alu::Mod, Reg::R2, Reg::R9)
            .store(Size::W, Reg::FRAME, -8, Reg::R2)
            .atomic(Atomic::FetchAdd, Size::Dw, Reg::R8, 0, Reg::R2)
            .call(Helper::SkSelectReuseport);
        let code = asm.finish().unwrap();
        assert_eq!(
            code.iter().map(|insn| insn.to_bytes()).collect::<Vec<_>>(),
            [
                [0xbf, 0x16, 0, 0, 0, 0, 0, 0],
                [0x07, 0x02, 0, 0, 0xfc, 0xff, 0xff, 0xff],
                [0x9c, 0x92, 0, 0, 0, 0, 0, 0],
                [0x63, 0x2a, 0xf8, 0xff, 0, 0, 0, 0],
                [0xdb, 0x28, 0, 0, 1, 0, 0, 0],
                [0x85, 0, 0, 0, 82, 0, 0, 0],
            ]
        );
    }

    #[test]
    fn a_jump_to_a_label_never_defined_is_refused() {
        let mut asm = Asm::new();
        asm.mov64(Reg::R0, 1)
            .jump_if(Cond::Eq, Reg::R0, 0, "out")
            .exit();
        assert_eq!(
            asm.finish(),
            Err(AsmError::UndefinedLabel {
                label: "out",
                at: 1
            })
        );
    }

    #[test]
    fn a_label_defined_twice_is_refused() {
        let mut asm = Asm::new();
        asm.label("out").mov64(Reg::R0, 1).label("out").exit();
        assert_eq!(
            asm.finish(),
            Err(AsmError::DuplicateLabel {
                label: "out",
                first: 0,
                second: 1
            })
        );
    }

    #[test]
    fn a_label_past_the_last_instruction_is_refused() {
        let mut asm = Asm::new();
        asm.jump_if(Cond::Eq, Reg::R0, 0, "end").exit().label("end");
        assert_eq!(asm.finish(), Err(AsmError::LabelPastEnd { label: "end" }));
    }

    #[test]
    fn a_jump_beyond_an_i16_is_refused() {
        let mut asm = Asm::new();
        asm.jump_if(Cond::Ge, Reg::R1, 0, "far");
        for _ in 0..=i16::MAX {
            asm.mov64(Reg::R0, 0);
        }
        asm.label("far").exit();
        assert_eq!(
            asm.finish(),
            Err(AsmError::OffsetOutOfRange {
                label: "far",
                at: 0,
                offset: 32768
            })
        );
        // One instruction fewer fits.
        let mut asm = Asm::new();
        asm.jump_if(Cond::Ge, Reg::R1, 0, "far");
        for _ in 0..i16::MAX {
            asm.mov64(Reg::R0, 0);
        }
        asm.label("far").exit();
        assert_eq!(asm.finish().unwrap()[0].off, i16::MAX);
    }
}
