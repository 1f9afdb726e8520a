//! The machine: one KVM VM with one vCPU, guest memory and the platform
//! devices, driven by a small run loop (run -> exit -> device -> run).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::boot::{self, BootError};
use super::breakpoints::{BreakpointError, Breakpoints, Trap};
pub use super::dirty::DirtyLog;
use super::devices::{Block, DeviceState, Devices, DiskError, PortEffect};
use super::host::{Async, Control, Host, HostError, PollCtx};
use super::image::Image;
use super::layout::{self, ports, MAX_MEM, MIB, MIN_MEM};

const PAGE_SIZE: u64 = 4096;
use super::vcpu::{KickGuard, Kicker, Vcpu, VcpuError, VcpuState};
use super::watch::{WatchSpec, Watches};
use crate::vmm::counter::{BranchCounter, CounterStop, RunCounter};
use crate::vmm::counter::PmuError;
use crate::vmm::step::{Boundary, StepError, StepStop, Stepper};
use super::point::{fingerprint, ExecPoint};

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
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.mem_size as usize)])
            .map_err(|e| MachineError::Memory(e.to_string()))?;
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
        let dirty = Arc::new(DirtyLog::new(vm.clone(), config.mem_size / 4096));
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
            mem.write_slice(memory, GuestAddress(0)).map_err(|e| MachineError::Memory(e.to_string()))
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
        self.devices = Devices::from_state(&state.devices, block).map_err(|e| MachineError::State(e.to_string()))?;
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
            .map_err(|e| MachineError::Memory(e.to_string()))?;
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
        self.hashes.update(&self.mem, pages).map_err(MachineError::Memory)
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
            .map_err(|e| MachineError::Memory(e.to_string()))?;
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

    fn ctx(&self, guest_caused: bool) -> PollCtx {
        PollCtx {
            exits: self.exits,
            guest_caused,
            timer_deadline_ns: self.devices.timer.deadline_ns,
            serial_room: self.devices.serial.rx_room(),
            branches: self.branches,
            rip: None,
            fp: None,
            overflow: false,
            steps: self.stepper.stats.ring0_steps + self.stepper.stats.ring3_steps,
            watch: None,
        }
    }

    /// Installs (or removes) the PMU clock's branch counter. It counts from
    /// here on, the current count carrying on from `branches`. A real
    /// counter belongs to the thread it was opened on: run the machine there.
    pub fn set_counter(&mut self, counter: Option<Box<dyn BranchCounter + Send>>) -> Result<(), MachineError> {
        self.counter = match counter {
            Some(c) => Some(RunCounter::new(c, self.branches)?),
            None => None,
        };
        Ok(())
    }

    /// Takes the installed counter out (e.g. to look at a simulated one).
    pub fn take_counter(&mut self) -> Option<Box<dyn BranchCounter + Send>> {
        self.counter.take().map(RunCounter::into_inner)
    }

    pub fn has_counter(&self) -> bool {
        self.counter.is_some()
    }

    /// A guest-caused exit ended the interval: restart the count.
    fn counter_at_exit(&mut self) -> Result<(), MachineError> {
        self.bp_step_over = false;
        if let Some(c) = self.counter.as_mut() {
            c.at_exit()?;
        }
        Ok(())
    }

    /// The overflow owed to a guest-caused exit's poll.
    fn exit_overflow(&mut self) -> bool {
        self.counter.as_mut().is_some_and(RunCounter::take_exit_overflow)
    }

    /// Programs (or clears) the hardware breakpoint at `rip`.
    fn set_hw_bp(&mut self, rip: Option<u64>) -> Result<(), MachineError> {
        if rip == self.hw_bp {
            return Ok(());
        }
        let mut dbg = kvm_bindings::kvm_guest_debug::default();
        if let Some(r) = rip {
            dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[0] = r;
            dbg.arch.debugreg[7] = 0x1; // L0, execute, 1 byte
        }
        self.vcpu.fd.set_guest_debug(&dbg).map_err(StepError::GuestDebug)?;
        self.hw_bp = rip;
        Ok(())
    }

    /// A precise poll context at an exact boundary (reads the registers).
    /// A watched range the last instruction changed is reported here.
    fn precise_ctx(&mut self, rip: Option<u64>) -> Result<PollCtx, MachineError> {
        let regs = self.vcpu.regs()?;
        let mut c = self.ctx(true);
        c.rip = Some(rip.unwrap_or(regs.rip));
        c.fp = Some(fingerprint(&regs));
        c.watch = self.watch.hit.take();
        Ok(c)
    }

    /// Data watchpoints at native speed (measured on kvm_pvm: a write to a
    /// page in a read-only memory slot exits as KVM_EXIT_MMIO, ~40 us, with
    /// RIP already past the writing instruction). Each page holding one of
    /// the physical `ranges` gets a read-only slot of its own; the run loop
    /// performs every write to it, keeps the dirty log right, and reports a
    /// change of a watched range as a precise poll (`PollCtx::watch`). The
    /// guest sees the same memory; the rest of RAM runs natively. Empty:
    /// one slot for all RAM again.
    pub fn set_watches(&mut self, ranges: Vec<(u64, u64)>) -> Result<(), MachineError> {
        self.set_watch_specs(ranges.into_iter().map(|(a, l)| WatchSpec::changes(a, l)).collect())
    }

    /// [`Machine::set_watches`] with reads and every write (`vmm::watch`):
    /// a page watched for reads gets no memory slot at all, so reads exit
    /// too (~43 us each); the run loop performs them from guest RAM.
    pub fn set_watch_specs(&mut self, specs: Vec<WatchSpec>) -> Result<(), MachineError> {
        let total = self.config.mem_size / 4096;
        let (ro, none) = Watches::layout(&specs, &self.watch.code, total);
        self.watch.specs = specs;
        self.watch.hit = None;
        if ro == self.watch.ro && none == self.watch.none {
            return Ok(());
        }
        // Re-creating a slot clears its dirty bitmap: take what it holds first.
        self.dirty.sync_now()?;
        let base = self.mem.iter().next().map(|r| r.as_ptr() as u64).unwrap_or(0);
        let region = |slot: u32, first: u64, n: u64, flags: u32| kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: first * 4096,
            memory_size: n * 4096,
            userspace_addr: base + first * 4096,
        };
        for &slot in &self.slot_ids {
            // SAFETY: deleting a slot (size 0) touches no memory.
            setup("KVM_SET_USER_MEMORY_REGION", unsafe { self.vm.set_user_memory_region(region(slot, 0, 0, 0)) })?;
        }
        let (mut ids, mut logged, mut at) = (Vec::new(), Vec::new(), 0u64);
        let mut add = |first: u64, n: u64, ro: bool| -> Result<(), MachineError> {
            let slot = ids.len() as u32;
            let flags = if ro { kvm_bindings::KVM_MEM_READONLY } else { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES };
            // SAFETY: the range lies inside the live mmap owned by `mem`,
            // which the Machine keeps for as long as the VM fd.
            setup("KVM_SET_USER_MEMORY_REGION", unsafe { self.vm.set_user_memory_region(region(slot, first, n, flags)) })?;
            if !ro {
                logged.push((slot, first, n));
            }
            ids.push(slot);
            Ok(())
        };
        for &p in ro.union(&none) {
            if p > at {
                add(at, p - at, false)?;
            }
            if ro.contains(&p) {
                add(p, 1, true)?;
            }
            at = p + 1;
        }
        if at < total {
            add(at, total - at, false)?;
        }
        self.dirty.set_slots(logged);
        self.slot_ids = ids;
        self.watch.ro = ro;
        self.watch.none = none;
        Ok(())
    }

    /// Accesses to watched pages the run loop performed so far.
    pub fn watched_accesses(&self) -> u64 {
        self.watch.accesses
    }

    /// The watched ranges' bytes now (before a write or DMA).
    fn watched_bytes(watch: &Watches, mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        watch
            .specs
            .iter()
            .map(|s| {
                let mut b = vec![0u8; s.len as usize];
                let _ = mem.read_slice(&mut b, GuestAddress(s.start));
                b
            })
            .collect()
    }

    /// A guest write to a watched page (it exited as MMIO): performed here.
    fn watched_write(&mut self, addr: u64, data: &[u8]) -> Result<(), MachineError> {
        let before = if self.watch.wants_before() {
            Self::watched_bytes(&self.watch, &self.mem)
        } else {
            vec![Vec::new(); self.watch.specs.len()]
        };
        self.mem.write_slice(data, GuestAddress(addr)).map_err(|e| MachineError::Memory(e.to_string()))?;
        let pages = (addr >> 12..=(addr + data.len().max(1) as u64 - 1) >> 12).collect();
        self.dirty.note(&pages, &BTreeSet::new());
        let mem = &self.mem;
        self.watch.on_write(addr, data.len() as u64, &before, |a, l| {
            let mut b = vec![0u8; l as usize];
            let _ = mem.read_slice(&mut b, GuestAddress(a));
            b
        });
        self.watch.accesses += 1;
        // KVM finishes the access on the next entry (as for an IN).
        self.io_pending = true;
        Ok(())
    }

    /// A guest read of a page watched for reads (no slot: it exited as
    /// MMIO and the data was filled in from guest RAM).
    fn watched_read(&mut self, addr: u64, n: usize) {
        self.watch.on_read(addr, n as u64);
        self.watch.accesses += 1;
        self.io_pending = true;
    }

    /// The current execution point (reads RIP).
    pub fn exec_point(&self) -> Result<ExecPoint, MachineError> {
        Ok(ExecPoint { exits: self.exits, branches: self.branches, rip: self.vcpu.regs()?.rip })
    }

    fn deliver(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
        if !self.asyncs.is_empty() {
            let regs = self.vcpu.regs()?;
            let at = ExecPoint { exits: self.exits, branches: self.branches, rip: regs.rip };
            host.delivered(&at, fingerprint(&regs), &self.asyncs)?;
        }
        for a in self.asyncs.drain(..) {
            match a {
                Async::Timer { now_ns } => {
                    self.devices.timer.fire(now_ns);
                    self.devices.pic.raise(layout::IRQ_TIMER);
                }
                Async::SerialInput(bytes) => {
                    self.devices.serial.enqueue(&bytes);
                }
            }
        }
        self.devices.collect_irqs();
        Ok(())
    }

    /// Injects the next interrupt if the guest can take it, else asks KVM
    /// for an exit as soon as it can (not while stepping: every boundary is
    /// a chance anyway).
    ///
    /// Whether the guest can take it is read from its actual state (IF, the
    /// interrupt shadow, events in flight), not from kvm_run's flags: those
    /// describe the last exit, and go stale when the VMM itself changed the
    /// registers (a restore, or the stepper unwinding a #DB), which would
    /// make the landing point depend on history rather than on the state.
    fn inject(&mut self) -> Result<(), MachineError> {
        let Some(v) = self.devices.pic.next_vector() else {
            self.vcpu.fd.get_kvm_run().request_interrupt_window = 0;
            return Ok(());
        };
        let regs = self.vcpu.regs()?;
        let ev = self
            .vcpu
            .fd
            .get_vcpu_events()
            .map_err(|source| VcpuError::Kvm { op: "KVM_GET_VCPU_EVENTS", source })?;
        let can_take = regs.rflags & 0x200 != 0
            && ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.exception.pending == 0
            && ev.nmi.injected == 0;
        let stepping = self.stepper.is_armed();
        let run = self.vcpu.fd.get_kvm_run();
        if can_take {
            run.request_interrupt_window = 0;
            self.vcpu.inject_interrupt(v)?;
            self.devices.pic.ack(v);
        } else {
            run.request_interrupt_window = u8::from(!stepping);
        }
        Ok(())
    }

    fn idle(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
        if self.devices.wake_pending() {
            self.waiting = false;
            return Ok(());
        }
        // A precise host needs to know exactly where the guest waits: events
        // that arrive now belong to this boundary, not to later ones.
        let ctx = if host.precise(self.exits) || self.counter.is_some() {
            let mut c = self.precise_ctx(None)?;
            c.overflow = self.exit_overflow();
            c
        } else {
            self.ctx(true)
        };
        let mut asyncs = std::mem::take(&mut self.asyncs);
        let r = host.wait(&ctx, &mut asyncs);
        // Woken with nothing to deliver (the host wants to pause here): the
        // guest still waits, and must go on waiting when it resumes.
        self.waiting = asyncs.is_empty() && !self.devices.wake_pending();
        self.asyncs = asyncs;
        r?;
        self.deliver(host)
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

    /// Runs until the guest powers off or panics, or until `exit_limit`
    /// guest-caused exits have happened (then returns `Stop::Paused`).
    pub fn run(&mut self, host: &mut dyn Host, exit_limit: Option<u64>) -> Result<Stop, MachineError> {
        let _guard = KickGuard::register(&mut self.vcpu.fd);
        self.sregs_synced = false;
        if !self.bps.is_empty() {
            // Where the run starts is the caller's business, not an arrival.
            let rip = self.vcpu.regs()?.rip;
            if self.bps.sites().contains(&rip) {
                let steps = self.stepper.stats.ring0_steps + self.stepper.stats.ring3_steps;
                self.site_step_over = Some((steps, self.exits));
            }
        }
        host.attach(Kicker::current());
        let r = self.run_loop(host, exit_limit);
        host.detach();
        // Saved state must not carry stepping artifacts (TF in RFLAGS).
        if self.stepper.is_armed() {
            self.stepper.disarm(&self.vcpu)?;
        }
        self.set_hw_bp(None)?;
        self.bps.disarm_debug(&self.vcpu)?;
        self.bp = None;
        // Leave the machine savable: a pending IN gets its result now.
        self.complete_pending_io()?;
        r
    }

    /// The run loop: decide how to enter (see [`Entry`]), run the vCPU to
    /// its next exit, let the devices and the host act on it, repeat.
    fn run_loop(&mut self, host: &mut dyn Host, exit_limit: Option<u64>) -> Result<Stop, MachineError> {
        loop {
            if matches!(exit_limit, Some(l) if self.exits >= l) || self.pause_requested {
                self.pause_requested = false;
                return Ok(Stop::Paused);
            }
            if self.arrival_after_exit(host)? {
                continue;
            }
            if self.waiting {
                // Resumed (or woken) while idle: wait on, at the same exit.
                self.idle(host)?;
                let ctx = self.ctx(true);
                self.poll_and_deliver(&ctx, host)?;
                continue;
            }
            let Some(entry) = self.prepare_entry(host)? else { continue };
            self.inject()?;
            if entry == Entry::Stepping {
                if let Some(stop) = self.stepper.before_run(&self.vcpu, &self.mem)? {
                    self.at_boundary(stop, host)?;
                    continue;
                }
            }
            let mut exit = self.enter(entry)?;
            if entry == Entry::Breakpoints && self.after_breakpoint_run(&exit, host)? {
                continue;
            }
            let stepping = entry == Entry::Stepping;
            let exit_boundary = self.after_exit(&mut exit, stepping, host)?;
            let action = std::mem::replace(&mut exit.action, Action::None);
            match self.act(action, stepping, host)? {
                Flow::Next => continue,
                Flow::Stop(stop) => return Ok(stop),
                Flow::Poll => {}
            }
            if let Some(ctx) = self.exit_ctx(&exit, stepping, exit_boundary, host)? {
                self.poll_and_deliver(&ctx, host)?;
            }
        }
    }

    /// The boundary after a guest-caused exit of a free run with native
    /// breakpoints, where an injection, stepping or a counter is next: a
    /// free run from here would trap at a site here by itself, they would
    /// pass it unseen. Reports the arrival there (true) if a site is there.
    fn arrival_after_exit(&mut self, host: &mut dyn Host) -> Result<bool, MachineError> {
        let exit_check = std::mem::take(&mut self.bp_exit_check) && !self.bps.is_empty() && !self.waiting;
        if !(exit_check
            && (self.devices.pic.next_vector().is_some() || self.counter.is_some() || host.precise(self.exits)))
        {
            return Ok(false);
        }
        // As stepping would stop there: the exiting instruction retired,
        // its events were delivered.
        self.complete_pending_io()?;
        let rip = self.vcpu.regs()?.rip;
        if !self.bps.sites().contains(&rip) {
            return Ok(false);
        }
        let mut ctx = self.precise_ctx(Some(rip))?;
        ctx.guest_caused = false;
        self.poll_and_deliver(&ctx, host)?;
        Ok(true)
    }

    /// Decides how the next entry runs the guest and arms the mechanism
    /// for it (counter, stepper, hardware or native breakpoints). None: the
    /// breakpoints cannot be armed here yet, loop again (one step first).
    fn prepare_entry(&mut self, host: &mut dyn Host) -> Result<Option<Entry>, MachineError> {
        // The PMU clock: program what the host wants from the counter.
        let mut plan = crate::vmm::counter::CounterPlan::default();
        if let Some(c) = self.counter.as_mut() {
            plan = host.counter_plan(self.exits, self.branches);
            c.program(plan.overflow_at)?;
        }
        self.bp = plan.breakpoint;
        let (counter_steps, breakpoints_ok) = match self.counter.as_ref() {
            Some(c) => (c.needs_stepping(), c.breakpoints_ok()),
            None => (false, false),
        };
        let use_hw_bp = self.bp.is_some() && breakpoints_ok && !self.bp_step_over;
        self.host_precise = host.precise(self.exits);
        // Native breakpoints: run free from ring 3; step off a site we
        // stand on, and through ring 0 (see vmm::breakpoints).
        let bp_mode = !self.bps.is_empty() && self.counter.is_none() && self.bp.is_none();
        let bp_step = bp_mode && !self.host_precise && self.bp_must_step()?;
        // Step for the host, for a counter that counts by stepping, or
        // to reach a breakpoint RIP that no hardware breakpoint watches.
        let precise = self.host_precise || counter_steps || (self.bp.is_some() && !use_hw_bp) || bp_step;
        if precise != self.stepper.is_armed() {
            if precise {
                self.set_hw_bp(None)?;
                self.bps.disarm_debug(&self.vcpu)?;
                self.stepper.arm(&self.vcpu, &self.mem)?;
            } else {
                self.stepper.disarm(&self.vcpu)?;
                self.hw_bp = None; // disarming cleared all guest debugging
            }
        }
        if self.stepper.is_armed() {
            return Ok(Some(Entry::Stepping));
        }
        if bp_mode {
            return Ok(self.arm_breakpoints()?.then_some(Entry::Breakpoints));
        }
        self.bps.disarm_debug(&self.vcpu)?;
        self.set_hw_bp(if use_hw_bp { self.bp } else { None })?;
        Ok(Some(Entry::Free { hw_bp: self.hw_bp }))
    }

    /// Patches the native breakpoints in for a free run. False where they
    /// cannot be armed (no IDT yet, or ring 0 with its returns unknown):
    /// the loop steps one instruction (learning returns), then retries.
    fn arm_breakpoints(&mut self) -> Result<bool, MachineError> {
        if self.sync_sregs.is_none() {
            let ok = self.vm.check_extension(kvm_ioctls::Cap::SyncRegs);
            if ok {
                self.vcpu.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
            }
            self.sync_sregs = Some(ok);
        }
        let synced = self.sregs_synced.then(|| self.vcpu.fd.sync_regs().sregs);
        let entering = self.devices.pic.next_vector().is_some();
        if !self.bps.arm(&self.vcpu, &self.mem, synced, entering)? {
            let steps = self.stepper.stats.ring0_steps + self.stepper.stats.ring3_steps;
            self.site_step_over = Some((steps, self.exits));
            return Ok(false);
        }
        self.bp_prev = None;
        let code = self.bps.patched_pages();
        if !code.is_subset(&self.watch.code) {
            self.watch.code.extend(code);
            self.set_watch_specs(self.watch.specs.clone())?;
        }
        self.hw_bp = None; // guest debug now holds the breakpoints
        Ok(true)
    }

    /// One KVM_RUN, and what its exit means. Port and MMIO accesses reach
    /// the devices here (the exit's data lives in kvm_run only until the
    /// next entry).
    fn enter(&mut self, entry: Entry) -> Result<Exit, MachineError> {
        let exits_before = self.exits;
        let Machine { vcpu, devices, mem, exits, io_pending, branches, watch, .. } = self;
        let mut exit = Exit { action: Action::None, guest_caused: true, eintr: false, dma_before: None, counted: false };
        let mut count = || {
            *exits += 1;
            *branches = 0;
        };
        self.sregs_synced = false;
        match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count();
                *io_pending = true;
                exit.action = Action::from_port(devices.io_in(port, data), data.len());
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count();
                if port == ports::BLK_CMD && !watch.specs.is_empty() {
                    // A DMA may write a watched range: keep its bytes before.
                    exit.dma_before = Some(Self::watched_bytes(watch, mem));
                }
                exit.action = Action::from_port(devices.io_out(port, data, mem), 0);
            }
            Ok(VcpuExit::MmioRead(addr, data)) if watch.watched_page(addr) => {
                // A page watched for reads (no slot): not an exit.
                exit.guest_caused = false;
                *io_pending = true;
                let _ = mem.read_slice(data, GuestAddress(addr));
                exit.action = Action::WatchRead(addr, data.len());
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                count();
                *io_pending = true;
                data.fill(0xFF); // nothing is mapped there
            }
            Ok(VcpuExit::MmioWrite(addr, data)) if watch.watched_page(addr) => {
                // A data watchpoint's page, not a device: not an exit.
                exit.guest_caused = false;
                let mut b = [0u8; 16];
                let n = data.len().min(16);
                b[..n].copy_from_slice(&data[..n]);
                exit.action = Action::WatchWrite(addr, b, n);
            }
            Ok(VcpuExit::MmioWrite(..)) => count(),
            Ok(VcpuExit::Hlt) => {
                count();
                exit.action = Action::Halt;
            }
            Ok(VcpuExit::Debug(d)) => {
                exit.guest_caused = false;
                exit.action = match entry {
                    Entry::Stepping => Action::Step(d),
                    Entry::Breakpoints => Action::Trap(d),
                    Entry::Free { hw_bp: Some(_) } => Action::Breakpoint,
                    Entry::Free { hw_bp: None } => Action::Unexpected(format!("{:?}", VcpuExit::Debug(d))),
                };
            }
            Ok(VcpuExit::IrqWindowOpen) => exit.guest_caused = false,
            Ok(VcpuExit::Intr) => {
                exit.guest_caused = false;
                exit.eintr = true;
            }
            Ok(VcpuExit::Shutdown) => exit.action = Action::TripleFault,
            Ok(VcpuExit::InternalError) => exit.action = Action::Emulation("internal error (instruction emulation failed)".into()),
            Ok(VcpuExit::FailEntry(reason, _)) => exit.action = Action::Emulation(format!("VM entry failed, hardware reason {reason:#x}")),
            Ok(other) => exit.action = Action::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                exit.guest_caused = false;
                exit.eintr = true;
            }
            Err(e) => return Err(VcpuError::Kvm { op: "KVM_RUN", source: e }.into()),
        }
        exit.counted = self.exits != exits_before;
        Ok(exit)
    }

    /// After a free run with native breakpoints patched in: take the
    /// patches out (nothing else may see them) and handle what only that
    /// mode sees. True: the exit was handled, loop again.
    fn after_breakpoint_run(&mut self, exit: &Exit, host: &mut dyn Host) -> Result<bool, MachineError> {
        self.sregs_synced = self.sync_sregs == Some(true)
            && exit.guest_caused
            && exit.counted
            && matches!(exit.action, Action::None | Action::ClockRead(_) | Action::TimerProgram(_));
        self.bps.unpatch(&self.mem);
        self.bp_exit_check = exit.guest_caused && exit.counted;
        if let Some(site) = self.bps.take_overwritten().first() {
            return Err(MachineError::SiteOverwritten { site: *site });
        }
        if matches!(exit.action, Action::Emulation(_)) {
            let cpl = self.vcpu.sregs()?.cs.selector & 3;
            if let Some(t) = self.bps.on_emulation_failure(self.rip(), cpl) {
                self.bp_trap(t, host)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What every exit does before its action: note DMA (for watchpoints
    /// and the dirty log), read the counter at a guest-caused exit, pass
    /// serial output on. Returns where the step clock sees the boundary of
    /// an exiting instruction, if it retired.
    fn after_exit(&mut self, exit: &mut Exit, stepping: bool, host: &mut dyn Host) -> Result<Option<Boundary>, MachineError> {
        if let Some(before) = exit.dma_before.take().filter(|_| !self.devices.block.dma_pages.is_empty()) {
            // The block device wrote guest RAM itself (no exit showed it).
            let r = self.devices.block.regs;
            let mem = &self.mem;
            self.watch.on_dma(r.addr as u64, r.count as u64 * 512, &before, |a, l| {
                let mut b = vec![0u8; l as usize];
                let _ = mem.read_slice(&mut b, GuestAddress(a));
                b
            });
        }
        if !self.devices.block.dma_pages.is_empty() || !self.devices.block.written_sectors.is_empty() {
            let pages = std::mem::take(&mut self.devices.block.dma_pages);
            let sectors = std::mem::take(&mut self.devices.block.written_sectors);
            self.dirty.note(&pages, &sectors);
        }
        if exit.guest_caused && !matches!(exit.action, Action::Step(_) | Action::Breakpoint) && exit.counted {
            self.counter_at_exit()?;
        }
        let out = self.devices.serial.drain_output();
        if !out.is_empty() {
            host.output(&out)?;
        }
        if stepping && exit.guest_caused {
            return Ok(self.stepper.on_other_exit(&self.vcpu, &self.mem)?);
        }
        Ok(None)
    }

    /// Acts on an exit: a device effect, a stop, a trap of the debugging
    /// mechanics. [`Flow::Poll`]: the host polls at this exit next.
    fn act(&mut self, action: Action, stepping: bool, host: &mut dyn Host) -> Result<Flow, MachineError> {
        match action {
            Action::None => {}
            Action::Step(d) => {
                let stop = self.stepper.on_debug_exit(&self.vcpu, &self.mem, &d)?;
                self.at_boundary(stop, host)?;
                return Ok(Flow::Next);
            }
            Action::WatchWrite(addr, b, n) => {
                self.watched_write(addr, &b[..n])?;
                self.after_watched_access(true, stepping, host)?;
                return Ok(Flow::Next);
            }
            Action::WatchRead(addr, n) => {
                self.watched_read(addr, n);
                self.after_watched_access(false, stepping, host)?;
                return Ok(Flow::Next);
            }
            Action::Trap(d) => {
                match self.bps.on_debug_exit(&self.vcpu, &self.mem, &d)? {
                    Some(t) => self.bp_trap(t, host)?,
                    None => return Err(MachineError::UnexpectedExit { what: format!("debug exit {d:?}"), rip: self.rip() }),
                }
                return Ok(Flow::Next);
            }
            Action::Breakpoint => {
                self.at_landing_breakpoint(host)?;
                return Ok(Flow::Next);
            }
            Action::ClockRead(slot) => {
                let ctx = self.ctx(true);
                let now = host.clock_read(&ctx)?;
                let v = self.devices.clock.read_lo(now);
                self.fill_in(slot, v);
            }
            Action::TimerProgram(us) => {
                // The deadline depends on the time: an input, logged like a clock read.
                let ctx = self.ctx(true);
                let now = host.clock_read(&ctx)?;
                self.devices.timer.program(us, now);
            }
            Action::Halt => {
                let run = self.vcpu.fd.get_kvm_run();
                if run.if_flag == 0 {
                    return Err(MachineError::DeadHalt { rip: self.rip() });
                }
                self.idle(host)?;
            }
            Action::Idle => self.idle(host)?,
            Action::PowerOff(status) => return Ok(Flow::Stop(Stop::PowerOff(status))),
            Action::Panic => return Ok(Flow::Stop(Stop::Panic(self.guest_panic()?))),
            Action::TripleFault => return Err(MachineError::TripleFault { rip: self.rip() }),
            Action::Emulation(_) if !self.watch.none.is_empty() => {
                return Err(MachineError::WatchedCode { rip: self.rip() });
            }
            Action::Emulation(what) => {
                let cpl = self.vcpu.sregs().map(|s| s.cs.selector & 3).unwrap_or(0);
                return Err(MachineError::Emulation { rip: self.rip(), cpl, what });
            }
            Action::Unexpected(what) => return Err(MachineError::UnexpectedExit { what, rip: self.rip() }),
        }
        Ok(Flow::Poll)
    }

    /// After the VMM performed a watched access: where the boundary after
    /// it is reported.
    fn after_watched_access(&mut self, write: bool, stepping: bool, host: &mut dyn Host) -> Result<(), MachineError> {
        if stepping && write {
            // KVM emulated the write with RIP already past it and drops the
            // single-step trap of an instruction that needed an MMIO write
            // (as for OUT): this exit is the step's boundary.
            if let Some(b) = self.stepper.on_other_exit(&self.vcpu, &self.mem)? {
                self.complete_pending_io()?;
                self.at_boundary(StepStop::Boundary(b), host)?;
            }
        } else if !stepping && self.watch.hit.is_some() {
            // Free-running: the boundary after the access is here.
            self.complete_pending_io()?;
            let mut ctx = self.precise_ctx(None)?;
            ctx.guest_caused = false;
            self.poll_and_deliver(&ctx, host)?;
        }
        // Stepping through a read: the step's own boundary reports it.
        Ok(())
    }

    /// The hardware breakpoint on the landing RIP: read the counter here;
    /// step off it before it is armed again.
    fn at_landing_breakpoint(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
        let (overflow, count) = match self.counter.as_mut() {
            Some(c) => c.at_breakpoint()?,
            None => (false, self.branches),
        };
        self.branches = count;
        self.bp_step_over = true;
        self.hw_bp_hits += 1;
        let mut ctx = self.precise_ctx(None)?;
        ctx.overflow = overflow;
        self.poll_and_deliver(&ctx, host)
    }

    /// The host's poll after an exit, as exact as the clock needs it.
    /// None: no poll here (stepping: the next debug exit reports the
    /// boundary of the exiting instruction).
    fn exit_ctx(
        &mut self,
        exit: &Exit,
        stepping: bool,
        exit_boundary: Option<Boundary>,
        host: &mut dyn Host,
    ) -> Result<Option<PollCtx>, MachineError> {
        let counter_stop = match self.counter.as_mut() {
            Some(c) if exit.eintr => c.at_eintr(stepping)?,
            _ => None,
        };
        let ctx = if stepping {
            match exit_boundary {
                // The exiting instruction retired: this exit is the boundary.
                Some(b) => {
                    let mut c = self.precise_ctx(Some(b.rip))?;
                    c.overflow = self.exit_overflow();
                    c
                }
                // It retires on the next entry; a debug exit reports the boundary.
                None if exit.guest_caused => {
                    self.exit_poll_pending = true;
                    return Ok(None);
                }
                // (A kick while stepping: the counter noted it; the next
                // boundary is its stop, the vCPU may be mid-step now.)
                None => self.ctx(false),
            }
        } else if let Some((overflow, count)) = counter_stop {
            // The real counter's stop: its overflow signal or a kick made
            // KVM_RUN return at an instruction boundary. Read the count
            // and the registers here; the host may deliver right here.
            self.branches = count;
            let mut c = self.precise_ctx(None)?;
            c.overflow = overflow;
            c
        } else if exit.guest_caused && (self.counter.is_some() || host.precise(self.exits) || self.watch.hit.is_some()) {
            // Free-running, but the host needs this exit exactly: finish
            // the instruction (an IN completes on entry) so RIP is past it.
            self.complete_pending_io()?;
            let mut c = self.precise_ctx(None)?;
            c.overflow = self.exit_overflow();
            c
        } else {
            self.ctx(exit.guest_caused)
        };
        Ok(Some(ctx))
    }

    /// Whether native breakpoints must step rather than run free now: off
    /// a site just hit or a return site (or one step at a time where the
    /// breakpoints cannot be armed, see the run loop), or with an interrupt about to be injected (the step
    /// delivers it and runs the handler's first instruction, as stepping
    /// does, so handler entries are never arrivals).
    fn bp_must_step(&mut self) -> Result<bool, MachineError> {
        let steps = self.stepper.stats.ring0_steps + self.stepper.stats.ring3_steps;
        if let Some((s, e)) = self.site_step_over {
            if steps > s || self.exits != e {
                self.site_step_over = None;
            }
        }
        if self.site_step_over.is_some() || self.waiting {
            return Ok(true);
        }
        // An interrupt the guest cannot take yet (IF=0, as in its ring-0
        // handlers) waits for its window: the free run stops at the return
        // to ring 3 before the window opens. One it takes now is delivered
        // in a free run too, unless a site is at its handler's entry (a
        // step delivers it and runs that instruction, as stepping does).
        match self.devices.pic.next_vector() {
            Some(v) if self.vcpu.regs()?.rflags & 0x200 != 0 => {
                let s = self.vcpu.sregs()?;
                Ok(!self.bps.can_deliver_free(&self.mem, &s, v))
            }
            _ => Ok(false),
        }
    }

    /// A native breakpoint trapped: at a hit the guest stands at the site
    /// (unwound), which is a precise poll; the next entry steps off it.
    fn bp_trap(&mut self, t: Trap, host: &mut dyn Host) -> Result<(), MachineError> {
        match t {
            Trap::StepOver => {
                let steps = self.stepper.stats.ring0_steps + self.stepper.stats.ring3_steps;
                self.site_step_over = Some((steps, self.exits));
                Ok(())
            }
            Trap::Hit { rip } => {
                let ctx = self.precise_ctx(Some(rip))?;
                self.poll_and_deliver(&ctx, host)
            }
        }
    }

    fn poll_and_deliver(&mut self, ctx: &PollCtx, host: &mut dyn Host) -> Result<(), MachineError> {
        if ctx.rip.is_some_and(|r| self.bps.sites().contains(&r)) {
            // The host saw this arrival; do not trap on the same site again.
            self.site_step_over = Some((ctx.steps, self.exits));
        }
        let mut asyncs = std::mem::take(&mut self.asyncs);
        let r = host.poll(ctx, &mut asyncs);
        self.asyncs = asyncs;
        if r? == Control::Pause {
            self.pause_requested = true;
        }
        self.deliver(host)
    }

    /// A single-step stop: count the branch and let the host act here.
    fn at_boundary(&mut self, stop: StepStop, host: &mut dyn Host) -> Result<(), MachineError> {
        let b = match stop {
            StepStop::Boundary(b) | StepStop::GuestDebug(b) => b,
            StepStop::Internal => return Ok(()),
        };
        if b.branch_retired {
            self.branches += 1;
        }
        if !self.bps.is_empty() {
            if let (Some((rip, 0)), 3) = (self.bp_prev, b.cpl) {
                self.bps.learn_return(rip);
            }
            self.bp_prev = Some((b.rip, b.cpl));
        }
        let ctx = if self.counter.is_some() {
            // The counter clock: the host sees this boundary only if it asked
            // for every one, the counter stopped here (overflow, or a kick
            // that arrived during the step), an exit's poll is due here, or
            // it is the landing RIP. Otherwise the guest runs on, as it would
            // at full speed with a hardware counter.
            let stop = match self.counter.as_mut() {
                Some(c) => c.at_step(b.branch_retired),
                None => CounterStop::None,
            };
            let exit_poll = std::mem::take(&mut self.exit_poll_pending);
            let at_bp = self.bp == Some(b.rip);
            self.bp_step_over = false;
            if !(self.host_precise || stop != CounterStop::None || exit_poll || at_bp) {
                return Ok(());
            }
            if stop != CounterStop::None && self.counter.as_ref().is_some_and(RunCounter::breakpoints_ok) {
                // A hardware counter stepping (off a breakpoint): its count
                // is the truth. (The simulated one counts these very steps.)
                if let Some(c) = self.counter.as_mut() {
                    self.branches = c.count()?;
                }
            }
            let overflow = stop == CounterStop::Overflow;
            let mut c = self.precise_ctx(Some(b.rip))?;
            c.overflow = overflow;
            c
        } else {
            self.precise_ctx(Some(b.rip))?
        };
        self.poll_and_deliver(&ctx, host)
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
                .map_err(|e| MachineError::State(format!("reading the disk for the state hash: {e}")))?;
            h.update(chunk);
            at += n;
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Writes the answer of a pending IN into kvm_run's data area.
    fn fill_in(&mut self, slot: InSlot, value: u32) {
        let run = self.vcpu.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (direction in); the io union
        // member is valid and data_offset/size point inside the kvm_run mapping.
        unsafe {
            let io = run.__bindgen_anon_1.io;
            let base = (run as *mut kvm_bindings::kvm_run as *mut u8).add(io.data_offset as usize);
            let bytes = value.to_le_bytes();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base, slot.size.min(4));
        }
    }
}

/// How the next KVM_RUN runs the guest, decided afresh before each entry
/// from the host's wishes, the clock's counter and the debugging state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// One instruction at a time: for the host (step clock, seeks), for a
    /// counter that counts by stepping, to reach a landing RIP no hardware
    /// breakpoint watches, or to step off / through native breakpoints.
    Stepping,
    /// Free, with native breakpoints patched in (see `vmm::breakpoints`).
    Breakpoints,
    /// Free, with the PMU landing's hardware breakpoint if there is one.
    Free { hw_bp: Option<u64> },
}

/// One KVM_RUN's exit as the run loop sees it.
struct Exit {
    action: Action,
    /// A deterministic exit (I/O, MMIO, HLT), not a kick or a debug trap.
    guest_caused: bool,
    /// KVM_RUN was interrupted (a kick, or the counter's overflow signal).
    eintr: bool,
    /// A block command with data watchpoints set: the watched bytes before it.
    dma_before: Option<Vec<Vec<u8>>>,
    /// The exit counted (`Machine::exits` went up).
    counted: bool,
}

/// What the run loop does after acting on an exit.
enum Flow {
    /// Loop again: the action polled the host itself, or none is due.
    Next,
    /// The host polls at this exit.
    Poll,
    /// The run is over.
    Stop(Stop),
}

#[derive(Clone, Copy)]
struct InSlot {
    size: usize,
}

enum Action {
    None,
    Step(kvm_bindings::kvm_debug_exit_arch),
    /// The hardware breakpoint at the landing RIP.
    Breakpoint,
    /// A debug exit while native breakpoints are armed.
    Trap(kvm_bindings::kvm_debug_exit_arch),
    /// A write to a watched page: address, data, length.
    WatchWrite(u64, [u8; 16], usize),
    /// A read of a page watched for reads (data filled in): address, length.
    WatchRead(u64, usize),
    ClockRead(InSlot),
    TimerProgram(u32),
    Halt,
    Idle,
    PowerOff(u8),
    Panic,
    TripleFault,
    Emulation(String),
    Unexpected(String),
}

impl Action {
    /// What the run loop does for a port access's effect (`in_size`: the
    /// width of an IN, whose answer the loop may fill in later).
    fn from_port(e: PortEffect, in_size: usize) -> Action {
        match e {
            PortEffect::None => Action::None,
            PortEffect::ClockRead => Action::ClockRead(InSlot { size: in_size }),
            PortEffect::TimerProgram(us) => Action::TimerProgram(us),
            PortEffect::Idle => Action::Idle,
            PortEffect::PowerOff(v) => Action::PowerOff(v),
            PortEffect::Panic => Action::Panic,
        }
    }
}
