//! The ends a data-flow path can reach outside the guest's own computation:
//! values the log delivered (serial bytes, clock readings, disk sectors by
//! DMA, device registers) and bytes the loader put in memory from the boot
//! image.

use serde::Serialize;

use super::super::symbols::Symbols;
use super::Recording;
use crate::trace::Event;
use crate::vmm::layout::ports;

/// Where the log delivered a value from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// Byte `offset` of the serial input of log event `event` (read from the UART's FIFO).
    Serial {
        event: usize,
        offset: usize,
        byte: u8,
    },
    /// The clock reading of log event `event` (`high`: the latched upper half).
    Clock {
        event: usize,
        value: u64,
        high: bool,
    },
    /// Bytes `offset..offset+len` of disk sector `sector`, copied into memory by DMA.
    Disk { sector: u64, offset: u64, len: u64 },
    /// A device register read on `port` (state the replay recomputes, not an input).
    Device { port: u16, value: u64 },
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Serial {
                event,
                offset,
                byte,
            } => {
                write!(
                    f,
                    "serial input byte {offset} of event #{event} ({})",
                    show_byte(*byte)
                )
            }
            Input::Clock { event, value, high } => {
                write!(
                    f,
                    "clock reading of event #{event} ({value} ns{})",
                    if *high { ", latched high half" } else { "" }
                )
            }
            Input::Disk {
                sector,
                offset,
                len,
            } if *len == 1 => write!(f, "disk sector {sector} offset {offset}"),
            Input::Disk {
                sector,
                offset,
                len,
            } => write!(f, "disk sector {sector} offsets {offset}..{}", offset + len),
            Input::Device { port, value } => {
                write!(f, "device register at port {port:#x} (value {value:#x})")
            }
        }
    }
}

fn show_byte(b: u8) -> String {
    match b {
        0x20..=0x7e => format!("{:?} = {b:#04x}", b as char),
        _ => format!("{b:#04x}"),
    }
}

/// The (sector, offset) of physical byte `pa` of a DMA read of sectors
/// `lba`.. into the buffer at `base`: sectors are 512 bytes from its start.
pub(super) fn disk_position(lba: u64, base: u64, pa: u64) -> (u64, u64) {
    let off = pa - base;
    (lba + off / 512, off % 512)
}

/// The disk bytes such a DMA read put at physical `pa..pa+len`.
pub(super) fn disk_bytes(lba: u64, base: u64, pa: u64, len: u64) -> Input {
    let (sector, offset) = disk_position(lba, base, pa);
    Input::Disk {
        sector,
        offset,
        len,
    }
}

/// The (event index, offset in its bytes, byte) of byte `n` of the whole
/// serial input stream (all `Serial` events in log order).
fn serial_byte(rec: &Recording, n: u64) -> Option<(usize, usize, u8)> {
    let mut seen = 0u64;
    for (i, e) in rec.events.iter().enumerate() {
        if let Event::Serial { bytes, .. } = e {
            let len = bytes.len() as u64;
            if n < seen + len {
                let off = (n - seen) as usize;
                return Some((i, off, bytes[off]));
            }
            seen += len;
        }
    }
    None
}

/// Serial bytes the `Serial` events before log index `next` delivered.
pub(super) fn serial_delivered(rec: &Recording, next: usize) -> u64 {
    rec.events[..next.min(rec.events.len())]
        .iter()
        .map(|e| {
            if let Event::Serial { bytes, .. } = e {
                bytes.len() as u64
            } else {
                0
            }
        })
        .sum()
}

fn clock_value(rec: &Recording, event: usize) -> u64 {
    match rec.events.get(event) {
        Some(Event::Clock { value, .. }) => *value,
        _ => 0,
    }
}

/// Where the value `value` a port read at exit `exits` returned came from:
/// the serial byte at stream position `serial_head` (the FIFO's head before
/// the read), the clock event the read answers, or the device itself.
pub(super) fn port_input(
    rec: &Recording,
    exits: u64,
    port: Option<u16>,
    value: u64,
    serial_head: Option<u64>,
) -> Option<Input> {
    let clock = |event: usize, high: bool| Input::Clock {
        event,
        value: clock_value(rec, event),
        high,
    };
    match port {
        Some(ports::SERIAL_BASE) => match serial_head.and_then(|n| serial_byte(rec, n)) {
            Some((event, offset, byte)) => Some(Input::Serial {
                event,
                offset,
                byte,
            }),
            None => Some(Input::Device {
                port: ports::SERIAL_BASE,
                value,
            }),
        },
        Some(ports::CLOCK_LO) => rec
            .events
            .iter()
            .position(|e| matches!(e, Event::Clock { exits: x, .. } if *x == exits))
            .map(|event| clock(event, false)),
        Some(ports::CLOCK_HI) => rec
            .events
            .iter()
            .rposition(|e| matches!(e, Event::Clock { exits: x, .. } if *x <= exits))
            .map(|event| clock(event, true)),
        Some(p) => Some(Input::Device { port: p, value }),
        None => None,
    }
}

/// The recorded guest image: where loaded bytes came from in the ELF file.
pub struct Image {
    /// (physical start, file offset, size in the file, virtual start).
    segments: Vec<(u64, u64, u64, u64)>,
    pub symbols: Symbols,
}

impl Image {
    pub fn open(rec: &Recording) -> Image {
        let b = &rec.image;
        Image {
            segments: load_segments(b).unwrap_or_default(),
            symbols: Symbols::from_elf(b),
        }
    }

    /// The ELF file offset and virtual address of physical byte `pa`, when the loader put it there from the file.
    pub fn file_offset(&self, pa: u64) -> Option<(u64, u64)> {
        self.segments
            .iter()
            .find(|(p, _, n, _)| pa >= *p && pa - p < *n)
            .and_then(|(p, off, _, va)| Some((off.checked_add(pa - p)?, va.checked_add(pa - p)?)))
    }
}

fn load_segments(b: &[u8]) -> Option<Vec<(u64, u64, u64, u64)>> {
    let u16_at = |o: usize| {
        Some(u16::from_le_bytes(
            b.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |o: usize| {
        Some(u32::from_le_bytes(
            b.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| {
        Some(u64::from_le_bytes(
            b.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    if b.get(..4)? != b"\x7fELF" || *b.get(4)? != 2 {
        return None;
    }
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    let mut v = Vec::new();
    for i in 0..phnum {
        let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(h)? != 1 {
            continue; // PT_LOAD only
        }
        let (off, va, pa, filesz) = (
            u64_at(h + 8)?,
            u64_at(h + 16)?,
            u64_at(h + 24)?,
            u64_at(h + 32)?,
        );
        v.push((pa, off, filesz, va));
    }
    Some(v)
}
