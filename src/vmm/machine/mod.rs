//! The machine: one KVM VM with one vCPU, guest memory and the platform
//! devices, driven by a small run loop (run -> exit -> device -> run).

use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::boot::{self, BootError};
use super::breakpoints::{BreakpointError, Breakpoints};
pub use super::dirty::DirtyLog;
use super::devices::{Block, DeviceState, Devices, DiskError};
use super::host::{Async, HostError};
use super::image::Image;
use super::layout::{MAX_MEM, MIB, MIN_MEM};

use super::vcpu::{Vcpu, VcpuError, VcpuState};
use super::watch::Watches;
use crate::vmm::counter::RunCounter;
use crate::vmm::counter::PmuError;
use crate::vmm::step::{StepError, Stepper};
use super::point::{fingerprint, ExecPoint};

mod debug;
mod run;
mod watching;

use run::{Action, Exit};

const PAGE_SIZE: u64 = 4096;

/// How a VM is built. Saved in checkpoints and recordings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub mem_size: u64,
    pub cmdline: String,
    pub disk: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { mem_size: 64 * MIB, cmdline: String::new(), disk: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it? try `revirt doctor`)")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM setup failed ({op}): {source}")]
    Setup { op: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory size of {0} bytes is not usable: it must be a multiple of 2 MiB from {min} to {max} MiB", min = MIN_MEM >> 20, max = MAX_MEM >> 20)]
    MemSize(u64),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("guest memory: {what}: {source}")]
    MemoryAccess { what: &'static str, #[source] source: Box<dyn std::error::Error + Send + Sync> },
    #[error("the disk: {what}: {source}")]
    DiskAccess { what: &'static str, #[source] source: std::io::Error },
    #[error("device state: {0}")]
    DeviceState(#[from] super::devices::serial::SerialStateError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("{0}")]
    State(String),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip {rip:#x}")]
    TripleFault { rip: u64 },
    #[error("KVM could not run the guest instruction at rip {rip:#x} (cpl {cpl}): {what}")]
    Emulation { rip: u64, cpl: u16, what: String },
    #[error("the guest halted with interrupts disabled at rip {rip:#x}; it can never wake up")]
    DeadHalt { rip: u64 },
    #[error("unexpected vCPU exit {what} at rip {rip:#x}")]
    UnexpectedExit { what: String, rip: u64 },
    #[error("single-stepping failed: {0}")]
    Step(#[from] StepError),
    #[error("branch counter: {0}")]
    Counter(#[from] PmuError),
    #[error("breakpoints: {0}")]
    Breakpoint(#[from] BreakpointError),
    #[error("the guest wrote over the breakpoint site {site:#x} while it was patched: hits after that write may have been missed")]
    SiteOverwritten { site: u64 },
    /// The guest ran code (or the CPU walked tables) on a page watched for
    /// reads, which has no memory slot: native watching cannot go on there.
    #[error("code at rip {rip:#x} runs from (or the CPU reads tables on) a page watched for reads: watch it by single-stepping instead")]
    WatchedCode { rip: u64 },
}

/// An unhandled exception the guest kernel reported on the panic port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPanic {
    pub vector: u8,
    pub error_code: Option<u64>,
    pub rip: u64,
    pub cs: u64,
    pub rsp: u64,
    pub cr2: u64,
}

impl std::fmt::Display for GuestPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [&str; 21] = [
            "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
            "#BR bound range", "#UD invalid opcode", "#NM device not available",
            "#DF double fault", "coprocessor overrun", "#TS invalid TSS",
            "#NP segment not present", "#SS stack fault", "#GP general protection",
            "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
            "#MC machine check", "#XM SIMD error", "#VE virtualization",
        ];
        let name = NAMES.get(self.vector as usize).copied().unwrap_or("exception");
        write!(f, "guest exception {name} (vector {}) at rip {:#x} in ring {}", self.vector, self.rip, self.cs & 3)?;
        if let Some(e) = self.error_code {
            write!(f, ", error code {e:#x}")?;
        }
        if self.vector == 14 {
            write!(f, ", faulting address {:#x}", self.cr2)?;
        }
        write!(f, ", rsp {:#x}", self.rsp)
    }
}

/// Why the run loop returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest powered off with this status.
    PowerOff(u8),
    /// The guest kernel reported an unhandled exception.
    Panic(GuestPanic),
    /// The requested exit count was reached; the machine can be saved or resumed.
    Paused,
}

/// Full machine state except memory contents (see `trace::snapshot`).
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub config: VmConfig,
    pub vcpu: VcpuState,
    pub devices: DeviceState,
    pub exits: u64,
    /// Branches since the last exit: a stepped (precise) recording may
    /// checkpoint mid-interval, and the count must carry on from here.
    #[serde(default)]
    pub branches: u64,
    pub clock_ns: u64,
    /// The guest was waiting idle (HLT or the idle port) for an interrupt
    /// or input when it was saved: it must go on waiting, not run on.
    #[serde(default)]
    pub waiting: bool,
}

pub struct Machine {
    pub config: VmConfig,
    _kvm: Kvm,
    vm: Arc<VmFd>,
    dirty: Arc<DirtyLog>,
    /// Per-page hashes of memory, brought up to date from the dirty log.
    hashes: super::pagehash::PageHashes,
    /// Waiting idle for an interrupt or input (see `MachineState::waiting`).
    waiting: bool,
    pub vcpu: Vcpu,
    pub mem: GuestMemoryMmap,
    pub devices: Devices,
    /// Guest-caused exits (I/O, MMIO, HLT) so far: deterministic for a given input.
    pub exits: u64,
    /// An IN/MMIO read exit whose result KVM has not yet written to the guest.
    io_pending: bool,
    asyncs: Vec<Async>,
    pause_requested: bool,
    /// Single-steps the guest while the host asks for precision (step clock).
    pub stepper: Stepper,
    /// Conditional branches retired since the last guest-caused exit, counted
    /// while stepping (the step clock's fine time), or read from the branch
    /// counter at its stops.
    pub branches: u64,
    /// The PMU clock's branch counter (real or simulated), if installed.
    counter: Option<RunCounter>,
    /// A guest-caused exit whose instruction retires on the next entry: the
    /// boundary after it is that exit's poll.
    exit_poll_pending: bool,
    /// The host asked for every boundary this entry (step clock, seeks).
    host_precise: bool,
    /// The RIP the host wants reported (landing after an overflow).
    bp: Option<u64>,
    /// The hardware breakpoint programmed in KVM, if any.
    hw_bp: Option<u64>,
    /// Step once off a breakpoint that was hit (then re-arm it).
    bp_step_over: bool,
    /// Hardware-breakpoint exits taken so far (landing on a target RIP).
    pub hw_bp_hits: u64,
    /// Execution breakpoints reached at native speed (`vmm::breakpoints`).
    pub bps: Breakpoints,
    /// Step once off the breakpoint site we stand on before patching again:
    /// (steps, exits) when it was hit.
    site_step_over: Option<(u64, u64)>,
    /// The last stepped boundary (RIP, CPL) with breakpoints set: a step
    /// from ring 0 to ring 3 teaches `bps` a return site.
    bp_prev: Option<(u64, u8)>,
    /// KVM copies SREGS into kvm_run at every exit (KVM_CAP_SYNC_REGS):
    /// None until checked. Arming after a plain exit then needs no
    /// KVM_GET_SREGS (an ioctl costs ~10 us here: vcpu_load reads MSRs).
    sync_sregs: Option<bool>,
    /// kvm_run's SREGS copy is the vCPU's (the last KVM_RUN ended at a
    /// guest-caused exit of a free run and nothing set SREGS since).
    sregs_synced: bool,
    /// A guest-caused exit ended a free run with breakpoints: the boundary
    /// after it (once its poll delivered) may be an arrival at a site.
    bp_exit_check: bool,
    /// Data watchpoints at native speed (see [`Machine::set_watches`]).
    watch: Watches,
    /// The memory slots registered with KVM.
    slot_ids: Vec<u32>,
}

fn setup<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, MachineError> {
    r.map_err(|source| MachineError::Setup { op, source })
}

impl Machine {
    /// Builds an empty VM (memory, vCPU, devices) without loading anything:
    /// fill its memory, then [`Machine::load_state`].
    pub fn create(config: &VmConfig) -> Result<Machine, MachineError> {
        if !(MIN_MEM..=MAX_MEM).contains(&config.mem_size) || !config.mem_size.is_multiple_of(2 * MIB) {
            return Err(MachineError::MemSize(config.mem_size));
        }
        let kvm = Kvm::new().map_err(MachineError::NoKvm)?;
        let vm = setup("KVM_CREATE_VM", kvm.create_vm())?;
        // Manual dirty-log protection, where KVM has it: the dirty log can
        // then leave pages the guest rewrites every interval writable
        // (vmm::dirty), instead of taking a write fault on each again.
        let manual = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
            ..Default::default()
        };
        let manual = std::env::var_os("REVIRT_CLASSIC_DIRTY_LOG").is_none() && vm.enable_cap(&manual).is_ok();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.mem_size as usize)])
            .map_err(|e| MachineError::MemoryAccess { what: "mapping guest RAM", source: e.into() })?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the
            // Machine keeps for as long as the VM fd (dropped together).
            setup("KVM_SET_USER_MEMORY_REGION", unsafe { vm.set_user_memory_region(r) })?;
        }
        let fd = setup("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let vcpu = Vcpu::new(&kvm, fd)?;
        let block = Block::new(config.disk.as_deref())?;
        let vm = Arc::new(vm);
        let dirty = Arc::new(DirtyLog::new(vm.clone(), config.mem_size / 4096, manual));
        Ok(Machine {
            config: config.clone(),
            _kvm: kvm,
            vm,
            dirty,
            hashes: Default::default(),
            waiting: false,
            vcpu,
            mem,
            devices: Devices::new(block),
            exits: 0,
            io_pending: false,
            asyncs: Vec::new(),
            pause_requested: false,
            stepper: Stepper::new(),
            branches: 0,
            counter: None,
            exit_poll_pending: false,
            host_precise: false,
            bp: None,
            hw_bp: None,
            bp_step_over: false,
            hw_bp_hits: 0,
            bps: Breakpoints::default(),
            site_step_over: None,
            bp_prev: None,
            sync_sregs: None,
            sregs_synced: false,
            bp_exit_check: false,
            watch: Watches::default(),
            slot_ids: vec![0],
        })
    }

    /// Boots `image` fresh.
    pub fn boot(config: &VmConfig, image: &Image) -> Result<Machine, MachineError> {
        image.check_fits(config.mem_size).map_err(BootError::from)?;
        let m = Machine::create(config)?;
        let (_, frames) =
            boot::load(&m.mem, config.mem_size, image, &config.cmdline, m.devices.block.capacity() > 0 || config.disk.is_some())?;
        m.dirty.note_pages(frames);
        let sregs = boot::entry_sregs(m.vcpu.sregs()?);
        m.vcpu.set_sregs(&sregs)?;
        m.vcpu.set_regs(&boot::entry_regs(image.entry))?;
        Ok(m)
    }

    /// Rebuilds a machine from a saved state and memory image.
    pub fn restore(state: &MachineState, memory: &[u8]) -> Result<Machine, MachineError> {
        if memory.len() as u64 != state.config.mem_size {
            return Err(MachineError::State(format!(
                "memory image is {} bytes but the saved VM has {} bytes of RAM",
                memory.len(),
                state.config.mem_size
            )));
        }
        let m = Machine::restore_with(state, |mem| {
            mem.write_slice(memory, GuestAddress(0))
                .map_err(|e| MachineError::MemoryAccess { what: "restoring guest RAM", source: e.into() })
        })?;
        let pages = memory.chunks(PAGE_SIZE as usize).enumerate().filter(|(_, p)| p.iter().any(|&b| b != 0));
        m.dirty.note_pages(pages.map(|(i, _)| i as u64));
        Ok(m)
    }

    /// Rebuilds a machine whose memory `fill` writes into fresh (all-zero)
    /// guest RAM: callers that know which pages matter write only those,
    /// instead of staging a full copy of memory first. They must name the
    /// pages they wrote with [`Machine::note_pages`] (the memory digest and
    /// checkpoints read only noted or dirty pages).
    pub fn restore_with(
        state: &MachineState,
        fill: impl FnOnce(&GuestMemoryMmap) -> Result<(), MachineError>,
    ) -> Result<Machine, MachineError> {
        let mut m = Machine::create(&state.config)?;
        fill(&m.mem)?;
        m.load_state(state)?;
        Ok(m)
    }

    /// Loads vCPU, devices and counters into a machine whose memory is in place.
    pub fn load_state(&mut self, state: &MachineState) -> Result<(), MachineError> {
        if state.config.mem_size != self.config.mem_size {
            return Err(MachineError::State(format!(
                "the saved VM has {} bytes of RAM, this one {}",
                state.config.mem_size, self.config.mem_size
            )));
        }
        self.vcpu.restore(&state.vcpu)?;
        // The disk is this machine's own (a migration may have put it elsewhere).
        let block = Block::new(self.config.disk.as_deref())?;
        self.devices = Devices::from_state(&state.devices, block)?;
        self.exits = state.exits;
        self.branches = state.branches;
        self.waiting = state.waiting;
        Ok(())
    }

    /// The shared dirty-page log (for a migration thread).
    pub fn dirty_log(&self) -> Arc<DirtyLog> {
        self.dirty.clone()
    }

    /// Writes `bytes` into guest memory at page frame `frame` from the VMM
    /// side and notes the pages (see [`DirtyLog::note_pages`]).
    pub fn write_pages(&mut self, frame: u64, bytes: &[u8]) -> Result<(), MachineError> {
        self.mem
            .write_slice(bytes, GuestAddress(frame * PAGE_SIZE))
            .map_err(|e| MachineError::MemoryAccess { what: "writing pages", source: e.into() })?;
        self.dirty.note_pages(frame..frame + (bytes.len() as u64).div_ceil(PAGE_SIZE));
        Ok(())
    }

    /// Pages the VMM wrote outside [`Machine::write_pages`].
    pub fn note_pages(&self, pages: impl IntoIterator<Item = u64>) {
        self.dirty.note_pages(pages)
    }

    /// Brings the per-page hashes up to date: reads only the pages changed
    /// since the last call (O(pages written), not O(RAM)).
    fn update_hashes(&mut self) -> Result<(), MachineError> {
        let pages = self.dirty.take_hash_pages()?;
        self.hashes
            .update(&self.mem, pages)
            .map_err(|e| MachineError::MemoryAccess { what: "hashing pages", source: e.into() })
    }

    /// The frames of guest memory that hold anything but zeros, in order:
    /// all a full checkpoint needs (fresh RAM is zero). Costs O(pages
    /// written since the last call).
    pub fn nonzero_pages(&mut self) -> Result<Vec<u64>, MachineError> {
        self.update_hashes()?;
        let mut v: Vec<u64> = self.hashes.frames().collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Saves everything but memory. Completes a pending IN first, so the
    /// saved registers hold its result.
    pub fn save_state(&mut self, clock_ns: u64) -> Result<MachineState, MachineError> {
        self.complete_pending_io()?;
        Ok(MachineState {
            config: self.config.clone(),
            vcpu: self.vcpu.save()?,
            devices: self.devices.state(),
            exits: self.exits,
            branches: self.branches,
            clock_ns,
            waiting: self.waiting,
        })
    }

    /// A copy of all guest RAM.
    pub fn memory_bytes(&self) -> Result<Vec<u8>, MachineError> {
        let mut v = vec![0u8; self.config.mem_size as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(0))
            .map_err(|e| MachineError::MemoryAccess { what: "reading guest RAM", source: e.into() })?;
        Ok(v)
    }

    /// KVM finishes an IN/MMIO read only on the next KVM_RUN; with
    /// immediate_exit set it does so without running guest code.
    fn complete_pending_io(&mut self) -> Result<(), MachineError> {
        while self.io_pending {
            self.io_pending = false;
            self.vcpu.fd.set_kvm_immediate_exit(1);
            // The instruction may access a watched page again (a
            // read-modify-write, a second fragment): perform that too.
            let mut next = None;
            let r = match self.vcpu.fd.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) if self.watch.watched_page(addr) => {
                    let mut b = [0u8; 16];
                    let n = data.len().min(16);
                    b[..n].copy_from_slice(&data[..n]);
                    next = Some(Action::WatchWrite(addr, b, n));
                    Ok(())
                }
                Ok(VcpuExit::MmioRead(addr, data)) if self.watch.watched_page(addr) => {
                    let _ = self.mem.read_slice(data, GuestAddress(addr));
                    next = Some(Action::WatchRead(addr, data.len()));
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.errno()),
            };
            self.vcpu.fd.set_kvm_immediate_exit(0);
            match (r, next) {
                (Ok(()), Some(Action::WatchWrite(addr, b, n))) => self.watched_write(addr, &b[..n])?,
                (Ok(()), Some(Action::WatchRead(addr, n))) => self.watched_read(addr, n),
                (Err(libc::EINTR), _) | (Ok(()), _) => {}
                (Err(e), _) => {
                    return Err(VcpuError::Kvm {
                        op: "KVM_RUN (complete I/O)",
                        source: kvm_ioctls::Error::new(e),
                    }
                    .into())
                }
            }
        }
        Ok(())
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The current execution point (reads RIP).
    pub fn exec_point(&self) -> Result<ExecPoint, MachineError> {
        Ok(ExecPoint { exits: self.exits, branches: self.branches, rip: self.vcpu.regs()?.rip })
    }

    fn rip(&self) -> u64 {
        self.vcpu.regs().map(|r| r.rip).unwrap_or(0)
    }

    fn guest_panic(&self) -> Result<GuestPanic, MachineError> {
        let r = self.vcpu.regs()?;
        let s = self.vcpu.sregs()?;
        let mut frame = [0u64; 6];
        let has_code = r.rsi & 1 == 1;
        for (i, slot) in frame.iter_mut().enumerate() {
            *slot = self.mem.read_obj(GuestAddress(r.rdi + 8 * i as u64)).unwrap_or(0);
        }
        let f = if has_code { &frame[1..] } else { &frame[..5] };
        Ok(GuestPanic {
            vector: r.rax as u8,
            error_code: has_code.then_some(frame[0]),
            rip: f[0],
            cs: f[1],
            rsp: f[3],
            cr2: s.cr2,
        })
    }

    /// Pages and disk sectors changed since the last checkpoint (KVM's
    /// dirty log for guest writes, plus the block device's DMA and writes).
    pub fn take_dirty(&mut self) -> Result<(Vec<u64>, Vec<u64>), MachineError> {
        self.dirty.take_checkpoint()
    }

    /// SHA-256 over everything that must match after an exact replay:
    /// registers, device state, all of memory (as the per-page digest of
    /// `pagehash`, which changes with any byte of memory but is kept up to
    /// date from the dirty log) and the disk.
    pub fn state_hash(&mut self) -> Result<String, MachineError> {
        use sha2::{Digest, Sha256};
        self.complete_pending_io()?;
        let r = self.vcpu.regs()?;
        let s = self.vcpu.sregs()?;
        let mut h = Sha256::new();
        for w in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.cs.selector as u64, s.ss.selector as u64,
        ] {
            h.update(w.to_le_bytes());
        }
        h.update(serde_json::to_vec(&self.devices.state()).expect("device state serializes"));
        self.update_hashes()?;
        h.update(b"memory-pagehash-v1");
        h.update(self.hashes.digest());
        let cap = self.devices.block.capacity();
        let mut at = 0;
        while at < cap {
            let n = (cap - at).min(2048);
            let chunk = self
                .devices
                .block
                .read_sectors(at, n)
                .map_err(|source| MachineError::DiskAccess { what: "reading it for the state hash", source })?;
            h.update(chunk);
            at += n;
        }
        Ok(hex::encode(h.finalize()))
    }

}
