//! The run loop: how each KVM_RUN is entered, what its exit means, and
//! when the host is polled (see [`Entry`]).

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

use crate::vmm::devices::PortEffect;
use crate::vmm::host::{Control, Host, PollCtx};
use crate::vmm::layout::{self, ports};
use crate::vmm::vcpu::{KickGuard, Kicker, VcpuError};
use crate::vmm::counter::{CounterStop, RunCounter};
use crate::vmm::step::{Boundary, StepStop};
use super::*;

impl Machine {
    pub(super) fn ctx(&self, guest_caused: bool) -> PollCtx {
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

    pub(super) fn deliver(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
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
    pub(super) fn inject(&mut self) -> Result<(), MachineError> {
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

    pub(super) fn idle(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
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
    pub(super) fn run_loop(&mut self, host: &mut dyn Host, exit_limit: Option<u64>) -> Result<Stop, MachineError> {
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
    pub(super) fn arrival_after_exit(&mut self, host: &mut dyn Host) -> Result<bool, MachineError> {
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
    pub(super) fn prepare_entry(&mut self, host: &mut dyn Host) -> Result<Option<Entry>, MachineError> {
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

    /// One KVM_RUN, and what its exit means. Port and MMIO accesses reach
    /// the devices here (the exit's data lives in kvm_run only until the
    /// next entry).
    pub(super) fn enter(&mut self, entry: Entry) -> Result<Exit, MachineError> {
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

    /// What every exit does before its action: note DMA (for watchpoints
    /// and the dirty log), read the counter at a guest-caused exit, pass
    /// serial output on. Returns where the step clock sees the boundary of
    /// an exiting instruction, if it retired.
    pub(super) fn after_exit(&mut self, exit: &mut Exit, stepping: bool, host: &mut dyn Host) -> Result<Option<Boundary>, MachineError> {
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
    pub(super) fn act(&mut self, action: Action, stepping: bool, host: &mut dyn Host) -> Result<Flow, MachineError> {
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

    /// The host's poll after an exit, as exact as the clock needs it.
    /// None: no poll here (stepping: the next debug exit reports the
    /// boundary of the exiting instruction).
    pub(super) fn exit_ctx(
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

    pub(super) fn poll_and_deliver(&mut self, ctx: &PollCtx, host: &mut dyn Host) -> Result<(), MachineError> {
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
    pub(super) fn at_boundary(&mut self, stop: StepStop, host: &mut dyn Host) -> Result<(), MachineError> {
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

    /// Writes the answer of a pending IN into kvm_run's data area.
    pub(super) fn fill_in(&mut self, slot: InSlot, value: u32) {
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
pub(super) enum Entry {
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
pub(super) struct Exit {
    pub(super) action: Action,
    /// A deterministic exit (I/O, MMIO, HLT), not a kick or a debug trap.
    pub(super) guest_caused: bool,
    /// KVM_RUN was interrupted (a kick, or the counter's overflow signal).
    pub(super) eintr: bool,
    /// A block command with data watchpoints set: the watched bytes before it.
    pub(super) dma_before: Option<Vec<Vec<u8>>>,
    /// The exit counted (`Machine::exits` went up).
    pub(super) counted: bool,
}

/// What the run loop does after acting on an exit.
pub(super) enum Flow {
    /// Loop again: the action polled the host itself, or none is due.
    Next,
    /// The host polls at this exit.
    Poll,
    /// The run is over.
    Stop(Stop),
}

#[derive(Clone, Copy)]
pub(super) struct InSlot {
    size: usize,
}

pub(super) enum Action {
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
    pub(super) fn from_port(e: PortEffect, in_size: usize) -> Action {
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
