//! The platform's devices and the port bus that routes guest I/O to them.
//! Devices never reach outside the VM: time and input come from the run loop,
//! which gets them from the host (live devices, or a replay log).

pub mod block;
pub mod bus;
pub mod clock;
pub mod pic;
pub mod serial;
pub mod timer;

use serde::{Deserialize, Serialize};

pub use block::{Block, BlockRegs, DiskError};
pub use bus::{PortDevice, PortEffect, SystemPorts};
pub use clock::Clock;
pub use pic::Pic;
pub use serial::{Serial, SerialRegs};
pub use timer::Timer;

/// Device state a checkpoint carries (the disk contents are saved separately).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegs,
    pub pic: Pic,
    pub timer: Timer,
    pub clock: Clock,
    pub block: BlockRegs,
}

pub struct Devices {
    pub serial: Serial,
    pub pic: Pic,
    pub timer: Timer,
    pub clock: Clock,
    pub block: Block,
    pub system: SystemPorts,
}

impl Devices {
    pub fn new(block: Block) -> Devices {
        Devices {
            serial: Serial::default(),
            pic: Pic::default(),
            timer: Timer::default(),
            clock: Clock::default(),
            block,
            system: SystemPorts,
        }
    }

    pub fn state(&self) -> DeviceState {
        DeviceState {
            serial: self.serial.state(),
            pic: self.pic,
            timer: self.timer,
            clock: self.clock,
            block: self.block.regs,
        }
    }

    pub fn from_state(s: &DeviceState, mut block: Block) -> Result<Devices, serial::SerialStateError> {
        block.regs = s.block;
        Ok(Devices {
            serial: Serial::from_state(&s.serial)?,
            pic: s.pic,
            timer: s.timer,
            clock: s.clock,
            block,
            system: SystemPorts,
        })
    }

    /// Moves device interrupt requests into the PIC.
    pub fn collect_irqs(&mut self) {
        if self.serial.irq.take() {
            self.pic.raise(crate::vmm::layout::IRQ_SERIAL);
        }
    }

    /// Whether an idle guest has something to wake up for.
    pub fn wake_pending(&self) -> bool {
        self.pic.has_unmasked_pending() || self.serial.rx_ready()
    }
}
