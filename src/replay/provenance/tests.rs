//! The value-flow rules on hand-made steps (no machine needed).

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, Register};

use super::flow::flow;
use super::location::{gpr, Key, REG_BIT};
use super::render::ranges;
use super::*;
use crate::clock::ExecPoint;
/// A step of `code` at 0x1000 with rax..r15 = 0x100 * (i + 1) and the given memory accesses.
fn step(code: &[u8], mem: Vec<Access>) -> Step {
    let insn = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).decode();
    assert!(!insn.is_invalid());
    let regs: [u64; 16] = std::array::from_fn(|i| 0x100 * (i as u64 + 1));
    Step {
        at: ExecPoint {
            exits: 1,
            branches: 0,
            rip: 0x1000,
        },
        insn,
        bytes: code.to_vec(),
        ring: 3,
        before: regs,
        after: regs,
        mem,
        input: None,
        dma: None,
        irregular: false,
        interrupt: false,
    }
}

fn acc(pa: u64, n: usize, read: bool, write: bool) -> Access {
    Access {
        va: pa,
        pa,
        write,
        read,
        before: vec![0; n],
        after: vec![0; n],
    }
}

fn regs(keys: &[Key]) -> Vec<(usize, usize)> {
    keys.iter()
        .filter(|k| *k & REG_BIT != 0)
        .map(|k| (((k & !REG_BIT) / 8) as usize, ((k & !REG_BIT) % 8) as usize))
        .collect()
}

#[test]
fn a_byte_store_reads_al_not_its_address_registers() {
    // movb %al, -0x31(%rbp,%rbx)
    let f = flow(
        &step(&[0x88, 0x44, 0x1d, 0xcf], vec![acc(0x5000, 1, false, true)]),
        &mut InstructionInfoFactory::new(),
    );
    assert_eq!(regs(&f.sources), vec![(0, 0)]);
    assert_eq!(f.dests, vec![0x5000]);
    assert!(f.consts.is_empty());
}

#[test]
fn zeroing_idiom_and_immediates_are_constants() {
    // xor %eax,%eax: writes all of rax (zero extension) from nothing.
    let f = flow(
        &step(&[0x31, 0xc0], vec![]),
        &mut InstructionInfoFactory::new(),
    );
    assert!(f.sources.is_empty());
    assert_eq!(regs(&f.dests), (0..8).map(|b| (0, b)).collect::<Vec<_>>());
    assert_eq!(f.consts, vec![Constant::NoInputs]);
    // movabs $0x100000001b3, %r9
    let f = flow(
        &step(&[0x49, 0xb9, 0xb3, 0x01, 0, 0, 0, 0x01, 0, 0], vec![]),
        &mut InstructionInfoFactory::new(),
    );
    assert_eq!(
        f.consts,
        vec![Constant::Immediate {
            value: 0x100000001b3
        }]
    );
    assert_eq!(regs(&f.dests).len(), 8);
}

#[test]
fn explicit_register_operands_count_even_when_they_address_memory() {
    // add (%rax), %rax: the memory and rax's value.
    let f = flow(
        &step(&[0x48, 0x03, 0x00], vec![acc(0x6000, 8, true, false)]),
        &mut InstructionInfoFactory::new(),
    );
    assert_eq!(regs(&f.sources), (0..8).map(|b| (0, b)).collect::<Vec<_>>());
    assert_eq!(f.sources.iter().filter(|k| *k & REG_BIT == 0).count(), 8);
    // lea 8(%rbx), %rax: rbx is the value.
    let f = flow(
        &step(&[0x48, 0x8d, 0x43, 0x08], vec![]),
        &mut InstructionInfoFactory::new(),
    );
    assert_eq!(regs(&f.sources), (0..8).map(|b| (3, b)).collect::<Vec<_>>());
    // push %rbx: the slot from rbx; rsp is an address, not a value or a tracked write.
    let f = flow(
        &step(&[0x53], vec![acc(0x7000, 8, false, true)]),
        &mut InstructionInfoFactory::new(),
    );
    assert_eq!(regs(&f.sources), (0..8).map(|b| (3, b)).collect::<Vec<_>>());
    assert!(regs(&f.dests).is_empty());
    assert_eq!(f.dests.len(), 8);
}

#[test]
fn port_reads_and_dma_are_inputs() {
    // in (%dx), %al
    let mut s = step(&[0xec], vec![]);
    s.input = Some(Input::Serial {
        event: 2,
        offset: 56,
        byte: 0,
    });
    let f = flow(&s, &mut InstructionInfoFactory::new());
    assert!(f.sources.is_empty(), "dx is the port, not a value");
    assert_eq!(regs(&f.dests), vec![(0, 0)]);
    assert_eq!(
        f.input,
        Some(Input::Serial {
            event: 2,
            offset: 56,
            byte: 0
        })
    );
    // out %eax, (%dx) starting a DMA read of 2 sectors into 0x8000.
    let mut s = step(&[0xef], vec![]);
    s.dma = Some(Dma {
        lba: 5,
        addr: 0x8000,
        count: 2,
    });
    let f = flow(&s, &mut InstructionInfoFactory::new());
    assert_eq!(f.dests.len(), 1024);
    assert_eq!(f.dests[0], 0x8000);
}

#[test]
fn ranges_and_registers() {
    assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..3, 5, 7..9");
    assert_eq!(register_index("$rsp"), Some(4));
    assert_eq!(register_index("eax"), Some(0));
    assert_eq!(register_index("$xmm0"), None);
    assert_eq!(gpr(Register::AH), Some((0, 1, 1)));
    assert_eq!(gpr(Register::R9D), Some((9, 0, 4)));
}
