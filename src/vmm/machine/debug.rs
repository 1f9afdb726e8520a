//! The machine's debugging mechanics as the run loop uses them: the PMU
//! clock's counter and landing breakpoint, native breakpoints.

use crate::vmm::breakpoints::Trap;
use crate::vmm::host::{Host, PollCtx};
use crate::vmm::counter::{BranchCounter, RunCounter};
use super::*;

impl Machine {
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
    pub(super) fn counter_at_exit(&mut self) -> Result<(), MachineError> {
        self.bp_step_over = false;
        if let Some(c) = self.counter.as_mut() {
            c.at_exit()?;
        }
        Ok(())
    }

    /// The overflow owed to a guest-caused exit's poll.
    pub(super) fn exit_overflow(&mut self) -> bool {
        self.counter.as_mut().is_some_and(RunCounter::take_exit_overflow)
    }

    /// Programs (or clears) the hardware breakpoint at `rip`.
    pub(super) fn set_hw_bp(&mut self, rip: Option<u64>) -> Result<(), MachineError> {
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
    pub(super) fn precise_ctx(&mut self, rip: Option<u64>) -> Result<PollCtx, MachineError> {
        let regs = self.vcpu.regs()?;
        let mut c = self.ctx(true);
        c.rip = Some(rip.unwrap_or(regs.rip));
        c.fp = Some(fingerprint(&regs));
        c.watch = self.watch.hit.take();
        Ok(c)
    }

    /// Patches the native breakpoints in for a free run. False where they
    /// cannot be armed (no IDT yet, or ring 0 with its returns unknown):
    /// the loop steps one instruction (learning returns), then retries.
    pub(super) fn arm_breakpoints(&mut self) -> Result<bool, MachineError> {
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

    /// After a free run with native breakpoints patched in: take the
    /// patches out (nothing else may see them) and handle what only that
    /// mode sees. True: the exit was handled, loop again.
    pub(super) fn after_breakpoint_run(&mut self, exit: &Exit, host: &mut dyn Host) -> Result<bool, MachineError> {
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

    /// The hardware breakpoint on the landing RIP: read the counter here;
    /// step off it before it is armed again.
    pub(super) fn at_landing_breakpoint(&mut self, host: &mut dyn Host) -> Result<(), MachineError> {
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

    /// Whether native breakpoints must step rather than run free now: off
    /// a site just hit or a return site (or one step at a time where the
    /// breakpoints cannot be armed, see the run loop), or with an interrupt about to be injected (the step
    /// delivers it and runs the handler's first instruction, as stepping
    /// does, so handler entries are never arrivals).
    pub(super) fn bp_must_step(&mut self) -> Result<bool, MachineError> {
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
    pub(super) fn bp_trap(&mut self, t: Trap, host: &mut dyn Host) -> Result<(), MachineError> {
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
}
