//! The machine-state container: one versioned, integrity-checked encoding
//! of a paused machine's state (configuration, vCPU, devices, exit and
//! branch counts, guest clock), the same in snapshot files, checkpoints,
//! replay's session snapshots and a migration's final state.
//!
//! Layout: magic `b"RVSTATE\0"`, version (u32 LE), payload length (u64 LE),
//! payload (JSON of [`MachineStateV1`]), SHA-256 of everything before it
//! (32 bytes). A reader checks all of it before decoding a byte of the
//! payload, and refuses another magic, another version ("machine-state
//! format version N is not supported") or a bad hash with an error.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vmm::devices::DeviceState;
use crate::vmm::vcpu::VcpuState;
use crate::vmm::{MachineState, VmConfig};

pub const MAGIC: &[u8; 8] = b"RVSTATE\0";
pub const VERSION: u32 = 1;
/// Largest payload a reader accepts (a real one is tens of KiB).
pub const MAX_PAYLOAD: u64 = 16 << 20;
const HEAD: usize = 8 + 4 + 8;
const HASH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not a revirt machine state (bad magic)")]
    Magic,
    #[error("machine-state format version {0} is not supported; this revirt reads version {VERSION}")]
    Version(u32),
    #[error("machine state cut short")]
    Truncated,
    #[error("machine state of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("machine state damaged or tampered: its SHA-256 does not match")]
    Damaged,
    #[error("machine state has {0} bytes after its end")]
    Trailing(usize),
    #[error("machine state payload: {0}")]
    Payload(#[source] serde_json::Error),
}

/// Version 1 of the payload, field by field: the on-disk shape, kept apart
/// from `vmm::MachineState` so that a change there cannot change files
/// unnoticed (a new field needs a conversion here, a new shape of a nested
/// type fails `the_v1_payload_shape_is_pinned` and needs a new version).
/// Generic so that one definition serves writing (borrowed parts) and
/// reading (owned ones).
#[derive(Serialize, Deserialize)]
pub struct MachineStateV1<C, V, D> {
    /// How the VM is built: memory size, kernel command line, disk.
    pub config: C,
    /// Registers, XSAVE, XCRs, debug registers, MSRs, events, MP state
    /// (each KVM structure as its bytes in the KVM ABI).
    pub vcpu: V,
    /// Serial, PIC, timer, clock and block device registers.
    pub devices: D,
    /// Guest-caused exits so far.
    pub exits: u64,
    /// Conditional branches since the last exit (precise clocks).
    #[serde(default)]
    pub branches: u64,
    /// The guest clock (ns).
    pub clock_ns: u64,
    /// The guest was waiting idle for an interrupt or input.
    #[serde(default)]
    pub waiting: bool,
}

/// Wraps a payload in the container (tools and tests build containers
/// around payloads they changed on purpose; see [`encode`]).
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEAD + payload.len() + HASH);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(payload);
    let h: [u8; 32] = Sha256::digest(&b).into();
    b.extend_from_slice(&h);
    b
}

/// The container at the start of `b`: its payload and its whole length
/// (it may be followed by other data, as in a checkpoint file).
pub fn open(b: &[u8]) -> Result<(&[u8], usize), StateError> {
    if b.len() < 8 || &b[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    if b.len() < HEAD {
        return Err(StateError::Truncated);
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let len = u64::from_le_bytes(b[12..HEAD].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(StateError::TooLarge(len));
    }
    let end = HEAD + len as usize;
    if b.len() < end + HASH {
        return Err(StateError::Truncated);
    }
    if Sha256::digest(&b[..end]).as_slice() != &b[end..end + HASH] {
        return Err(StateError::Damaged);
    }
    Ok((&b[HEAD..end], end + HASH))
}

/// A machine state in the container.
pub fn encode(m: &MachineState) -> Vec<u8> {
    let v1 = MachineStateV1 {
        config: &m.config,
        vcpu: &m.vcpu,
        devices: &m.devices,
        exits: m.exits,
        branches: m.branches,
        clock_ns: m.clock_ns,
        waiting: m.waiting,
    };
    seal(&serde_json::to_vec(&v1).expect("machine state serializes"))
}

/// The machine state in `b`, which must hold exactly one container.
pub fn decode(b: &[u8]) -> Result<MachineState, StateError> {
    let (payload, n) = open(b)?;
    if n != b.len() {
        return Err(StateError::Trailing(b.len() - n));
    }
    decode_payload(payload)
}

/// A payload's machine state (the container already checked).
pub fn decode_payload(payload: &[u8]) -> Result<MachineState, StateError> {
    let v: MachineStateV1<VmConfig, VcpuState, DeviceState> = serde_json::from_slice(payload).map_err(StateError::Payload)?;
    Ok(MachineState {
        config: v.config,
        vcpu: v.vcpu,
        devices: v.devices,
        exits: v.exits,
        branches: v.branches,
        clock_ns: v.clock_ns,
        waiting: v.waiting,
    })
}

/// A machine state held in the container (replay's session snapshots, a
/// migration's final state): checked again when opened. In JSON (the
/// migration's `State` frame) it travels as a hex string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    pub fn of(m: &MachineState) -> Sealed {
        Sealed(encode(m))
    }

    pub fn open(&self) -> Result<MachineState, StateError> {
        decode(&self.0)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Sealed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Sealed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sealed, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map(Sealed).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A machine state built without KVM (for format tests).
    pub(crate) fn sample() -> MachineState {
        let block = crate::vmm::devices::Block::new(None).unwrap();
        MachineState {
            config: VmConfig::default(),
            vcpu: VcpuState {
                mp_state: Default::default(),
                regs: kvm_bindings::kvm_regs { rip: 0x1234, rax: 7, ..Default::default() },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                msrs: vec![(0x10, 99)],
                events: Default::default(),
            },
            devices: crate::vmm::devices::Devices::new(block).state(),
            exits: 42,
            branches: 3,
            clock_ns: 1_000_000,
            waiting: true,
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(&sample());
        let m = decode(&b).unwrap();
        assert_eq!((m.exits, m.branches, m.clock_ns, m.waiting, m.vcpu.regs.rip, m.vcpu.msrs.clone()), (42, 3, 1_000_000, true, 0x1234, vec![(0x10, 99)]));
        assert_eq!(m.devices, sample().devices);
        assert_eq!(encode(&m), b, "decoding and encoding again gives the same bytes");
        let s = Sealed::of(&m);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Sealed>(&json).unwrap(), s);
    }

    /// A wrong magic, an unknown version, a bad hash, a cut: each a clear error, never a panic.
    #[test]
    fn bad_containers_are_refused_by_name() {
        let good = encode(&sample());
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(decode(&magic), Err(StateError::Magic)));
        let mut version = good.clone();
        version[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode(&version).unwrap_err();
        assert_eq!(e.to_string(), "machine-state format version 7 is not supported; this revirt reads version 1");
        let mut flipped = good.clone();
        flipped[HEAD + 5] ^= 1;
        assert!(matches!(decode(&flipped), Err(StateError::Damaged)));
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(StateError::Trailing(1))));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(StateError::TooLarge(_))));
        // A payload that is well sealed but is not a machine state.
        assert!(matches!(decode(&seal(b"{\"exits\": 1}")), Err(StateError::Payload(_))));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err());
        }
    }

    /// The JSON keys of a version-1 payload, nested ones included, and the
    /// lengths of its arrays (a KVM structure is its bytes): a change to
    /// vmm's state types that would change the files fails here, and needs
    /// a new container version (and a reader for version 1).
    #[test]
    fn the_v1_payload_shape_is_pinned() {
        fn shape(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, x) in m {
                        let p = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                        shape(x, &p, out);
                    }
                }
                serde_json::Value::Array(a) => out.push(format!("{at}[{}]", a.len())),
                _ => out.push(at.to_string()),
            }
        }
        let (payload, _) = open(&encode(&sample())).map(|(p, n)| (p.to_vec(), n)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let mut k = Vec::new();
        shape(&v, "", &mut k);
        assert_eq!(k.join(" "), PINNED.split_whitespace().collect::<Vec<_>>().join(" "));
    }

    const PINNED: &str = "
        branches clock_ns config.cmdline config.disk config.mem_size
        devices.block.addr devices.block.count devices.block.lba devices.block.status
        devices.clock.latched_hi devices.pic.in_service devices.pic.mask devices.pic.pending
        devices.serial.baud_divisor_high devices.serial.baud_divisor_low devices.serial.in_buffer[0]
        devices.serial.interrupt_enable devices.serial.interrupt_identification devices.serial.line_control
        devices.serial.line_status devices.serial.modem_control devices.serial.modem_status devices.serial.scratch
        devices.timer.deadline_ns devices.timer.fired devices.timer.period_us exits
        vcpu.debugregs[128] vcpu.events[64] vcpu.mp_state[4] vcpu.msrs[1] vcpu.regs[144] vcpu.sregs[312]
        vcpu.xcrs[392] vcpu.xsave[4096] waiting";
}
