//! The port bus: routes a guest IN or OUT to the device that owns the port.
//! Devices answer from their own state; what needs the outside world (the
//! time, waiting idle, powering off) comes back as a [`PortEffect`] for the
//! run loop, which asks its host, so devices stay deterministic.

use vm_memory::GuestMemoryMmap;

use super::{Block, Clock, Devices, Pic, Serial, Timer};
use crate::vmm::layout::ports;

/// What a port access asks of the run loop beyond the device's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// An IN of the clock's low half: answered with the host's time.
    ClockRead,
    /// The timer was given a period (µs): its deadline depends on the time.
    TimerProgram(u32),
    /// The guest waits idle for an interrupt or input.
    Idle,
    PowerOff(u8),
    Panic,
}

/// A device on the port bus. `port` is the absolute port number, always one
/// of the ports the bus routes to this device.
pub trait PortDevice {
    /// An IN: fill all of `data` (1, 2 or 4 bytes).
    fn read(&mut self, port: u16, data: &mut [u8]) -> PortEffect;
    /// An OUT of `data`; `mem` is guest RAM for devices that do DMA.
    fn write(&mut self, port: u16, data: &[u8], mem: &GuestMemoryMmap) -> PortEffect;
}

/// The platform's control ports (idle, power off, panic): no state.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemPorts;

impl Devices {
    /// The device that owns `port`, if any.
    fn device_at(&mut self, port: u16) -> Option<&mut dyn PortDevice> {
        Some(match port {
            ports::SERIAL_BASE..=ports::SERIAL_END => &mut self.serial,
            ports::CLOCK_LO | ports::CLOCK_HI => &mut self.clock,
            ports::TIMER_PERIOD => &mut self.timer,
            ports::PIC_EOI | ports::PIC_MASK => &mut self.pic,
            ports::BLK_LBA..=ports::BLK_CAPACITY => &mut self.block,
            ports::IDLE | ports::POWER_OFF | ports::PANIC => &mut self.system,
            _ => return None,
        })
    }

    /// A guest IN: unrouted ports read as all ones (nothing answers).
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) -> PortEffect {
        match self.device_at(port) {
            Some(d) => d.read(port, data),
            None => {
                data.fill(0xFF);
                PortEffect::None
            }
        }
    }

    /// A guest OUT: unrouted ports ignore it.
    pub fn io_out(&mut self, port: u16, data: &[u8], mem: &GuestMemoryMmap) -> PortEffect {
        let effect = match self.device_at(port) {
            Some(d) => d.write(port, data, mem),
            None => PortEffect::None,
        };
        if (ports::SERIAL_BASE..=ports::SERIAL_END).contains(&port) {
            // A write may raise the UART's interrupt (THR empty, ...).
            self.collect_irqs();
        }
        effect
    }
}

/// Little-endian value of up to 4 bytes of an OUT.
fn le(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Fills an IN's data with `v` (little-endian, as wide as the access).
fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

impl PortDevice for Serial {
    fn read(&mut self, port: u16, data: &mut [u8]) -> PortEffect {
        data[0] = Serial::read(self, (port - ports::SERIAL_BASE) as u8);
        data[1..].fill(0);
        PortEffect::None
    }
    fn write(&mut self, port: u16, data: &[u8], _: &GuestMemoryMmap) -> PortEffect {
        Serial::write(self, (port - ports::SERIAL_BASE) as u8, data[0]);
        PortEffect::None
    }
}

impl PortDevice for Clock {
    fn read(&mut self, port: u16, data: &mut [u8]) -> PortEffect {
        if port == ports::CLOCK_LO {
            return PortEffect::ClockRead;
        }
        put(data, self.read_hi());
        PortEffect::None
    }
    fn write(&mut self, _: u16, _: &[u8], _: &GuestMemoryMmap) -> PortEffect {
        PortEffect::None
    }
}

impl PortDevice for Timer {
    fn read(&mut self, _: u16, data: &mut [u8]) -> PortEffect {
        put(data, self.period_us);
        PortEffect::None
    }
    fn write(&mut self, _: u16, data: &[u8], _: &GuestMemoryMmap) -> PortEffect {
        PortEffect::TimerProgram(le(data))
    }
}

impl PortDevice for Pic {
    fn read(&mut self, port: u16, data: &mut [u8]) -> PortEffect {
        match port {
            ports::PIC_MASK => put(data, self.mask as u32),
            _ => data.fill(0xFF),
        }
        PortEffect::None
    }
    fn write(&mut self, port: u16, data: &[u8], _: &GuestMemoryMmap) -> PortEffect {
        match port {
            ports::PIC_EOI => self.eoi(),
            _ => self.set_mask(le(data) as u16),
        }
        PortEffect::None
    }
}

impl PortDevice for Block {
    fn read(&mut self, port: u16, data: &mut [u8]) -> PortEffect {
        put(data, self.read_port(port));
        PortEffect::None
    }
    fn write(&mut self, port: u16, data: &[u8], mem: &GuestMemoryMmap) -> PortEffect {
        self.write_port(port, le(data), mem);
        PortEffect::None
    }
}

impl PortDevice for SystemPorts {
    fn read(&mut self, _: u16, data: &mut [u8]) -> PortEffect {
        data.fill(0xFF);
        PortEffect::None
    }
    fn write(&mut self, port: u16, data: &[u8], _: &GuestMemoryMmap) -> PortEffect {
        match port {
            ports::IDLE => PortEffect::Idle,
            ports::POWER_OFF => PortEffect::PowerOff(le(data) as u8),
            _ => PortEffect::Panic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn devices() -> (Devices, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        (Devices::new(Block::new(None).unwrap()), mem)
    }

    #[test]
    fn routes_each_port_to_its_device() {
        let (mut d, mem) = devices();
        let mut b = [0u8; 4];
        assert_eq!(d.io_in(ports::CLOCK_LO, &mut b), PortEffect::ClockRead);
        assert_eq!(d.io_out(ports::TIMER_PERIOD, &1000u32.to_le_bytes(), &mem), PortEffect::TimerProgram(1000));
        d.io_out(ports::PIC_MASK, &0x00F0u32.to_le_bytes(), &mem);
        assert_eq!(d.pic.mask, 0x00F0);
        d.io_in(ports::PIC_MASK, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x00F0);
        assert_eq!(d.io_out(ports::POWER_OFF, &[7], &mem), PortEffect::PowerOff(7));
        assert_eq!(d.io_out(ports::IDLE, &[0], &mem), PortEffect::Idle);
        assert_eq!(d.io_out(ports::PANIC, &[0], &mem), PortEffect::Panic);
        d.io_out(ports::BLK_LBA, &5u32.to_le_bytes(), &mem);
        d.io_in(ports::BLK_LBA, &mut b);
        assert_eq!(u32::from_le_bytes(b), 5);
    }

    #[test]
    fn unrouted_ports_read_all_ones_and_ignore_writes() {
        let (mut d, mem) = devices();
        let mut b = [0u8; 2];
        assert_eq!(d.io_in(0x80, &mut b), PortEffect::None);
        assert_eq!(b, [0xFF, 0xFF]);
        assert_eq!(d.io_out(0x80, &[1], &mem), PortEffect::None);
    }

    #[test]
    fn a_serial_write_raises_its_interrupt_through_the_pic() {
        let (mut d, mem) = devices();
        // IER: enable the "transmitter holding register empty" interrupt.
        d.io_out(ports::SERIAL_BASE + 1, &[0x02], &mem);
        assert!(d.pic.pending & (1 << crate::vmm::layout::IRQ_SERIAL) != 0);
    }
}
