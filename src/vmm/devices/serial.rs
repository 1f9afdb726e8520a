//! COM1: vm-superio's 16550 model. Output is buffered here and drained by the
//! run loop, which hands it to the host (terminal, capture, recording).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};

/// Raises a flag the run loop turns into PIC line IRQ_SERIAL.
#[derive(Clone, Default)]
pub struct IrqFlag(pub Arc<AtomicBool>);

impl Trigger for IrqFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl IrqFlag {
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Collects guest output until the run loop drains it.
#[derive(Default)]
pub struct OutBuf(pub Vec<u8>);

impl Write for OutBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serializable copy of vm-superio's SerialState.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid serial state: {0}")]
pub struct SerialStateError(String);

pub struct Serial {
    uart: Uart<IrqFlag, NoEvents, OutBuf>,
    pub irq: IrqFlag,
}

impl Default for Serial {
    fn default() -> Self {
        let irq = IrqFlag::default();
        Serial { uart: Uart::new(irq.clone(), OutBuf::default()), irq }
    }
}

impl Serial {
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
    pub fn write(&mut self, offset: u8, value: u8) {
        // The only error is a trigger failure, and ours cannot fail.
        let _ = self.uart.write(offset, value);
    }
    /// Takes the guest output produced since the last call.
    pub fn drain_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.uart.writer_mut().0)
    }
    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
    /// Whether the guest has unread input (LSR data-ready).
    pub fn rx_ready(&self) -> bool {
        self.uart.fifo_capacity() < 64
    }
    /// Queues input for the guest; returns how many bytes fit.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_room());
        if n > 0 {
            let _ = self.uart.enqueue_raw_bytes(&bytes[..n]);
        }
        n
    }
    pub fn state(&self) -> SerialRegs {
        self.uart.state().into()
    }
    pub fn from_state(regs: &SerialRegs) -> Result<Serial, SerialStateError> {
        let irq = IrqFlag::default();
        let uart = Uart::from_state(&regs.into(), irq.clone(), NoEvents, OutBuf::default())
            .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(Serial { uart, irq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_input_and_state_round_trip() {
        let mut s = Serial::default();
        s.write(0, b'h');
        s.write(0, b'i');
        assert_eq!(s.drain_output(), b"hi");
        assert!(!s.rx_ready());
        assert_eq!(s.enqueue(b"abc"), 3);
        assert!(s.rx_ready());
        assert_eq!(s.read(0), b'a');
        let st = s.state();
        let mut t = Serial::from_state(&st).unwrap();
        assert_eq!(t.read(0), b'b');
        assert_eq!(t.read(0), b'c');
        assert!(!t.rx_ready());
        assert_eq!(s.enqueue(&[0u8; 100]), 62);
    }
}
