//! The vCPU: KVM's register files, their save/restore in a fixed order, and a
//! way for another thread to make `KVM_RUN` return (a "kick").

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM ioctl {op} failed: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
    #[error("KVM_SET_MSRS wrote {written} of {wanted} MSRs")]
    PartialMsrs { written: usize, wanted: usize },
}

fn ck<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError::Kvm { op, source })
}

/// MSRs a guest of ours can change and that a checkpoint must carry.
/// EFER lives in sregs; the rest are syscall/sysenter/TLS state and TSC.
const SAVED_MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0100, // FS_BASE
    0xC000_0101, // GS_BASE
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX
];

/// Everything KVM holds for one vCPU, in serializable form.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

pub struct Vcpu {
    pub fd: VcpuFd,
    msr_list: Vec<u32>,
}

impl Vcpu {
    pub fn new(kvm: &Kvm, fd: VcpuFd) -> Result<Vcpu, VcpuError> {
        let supported = ck("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
        let supported = supported.as_slice();
        let msr_list = SAVED_MSRS.iter().copied().filter(|m| supported.contains(m)).collect();
        let cpuid = ck(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        // Must precede KVM_SET_SREGS (measured: long-mode entry fails otherwise).
        ck("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
        Ok(Vcpu { fd, msr_list })
    }

    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        ck("KVM_GET_REGS", self.fd.get_regs())
    }
    pub fn set_regs(&self, r: &kvm_regs) -> Result<(), VcpuError> {
        ck("KVM_SET_REGS", self.fd.set_regs(r))
    }
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        ck("KVM_GET_SREGS", self.fd.get_sregs())
    }
    pub fn set_sregs(&self, s: &kvm_sregs) -> Result<(), VcpuError> {
        ck("KVM_SET_SREGS", self.fd.set_sregs(s))
    }
    pub fn fpu(&self) -> Result<kvm_bindings::kvm_fpu, VcpuError> {
        ck("KVM_GET_FPU", self.fd.get_fpu())
    }

    /// Saves the full vCPU state. Order follows Firecracker: MP state first,
    /// vCPU events last, so pending-event state is the freshest.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let mp_state = ck("KVM_GET_MP_STATE", self.fd.get_mp_state())?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let xsave = ck("KVM_GET_XSAVE", self.fd.get_xsave())?;
        let xcrs = ck("KVM_GET_XCRS", self.fd.get_xcrs())?;
        let debugregs = ck("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?;
        let entries: Vec<kvm_msr_entry> = self
            .msr_list
            .iter()
            .map(|&index| kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("MSR list is small");
        let n = ck("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        let events = ck("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?;
        Ok(VcpuState { mp_state, regs, sregs, xsave, xcrs, debugregs, msrs, events })
    }

    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        ck("KVM_SET_MP_STATE", self.fd.set_mp_state(s.mp_state))?;
        self.set_regs(&s.regs)?;
        self.set_sregs(&s.sregs)?;
        // SAFETY: the xsave buffer came from KVM_GET_XSAVE on a vCPU with the
        // same CPUID (both set from KVM_GET_SUPPORTED_CPUID on this host).
        ck("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&s.xsave) })?;
        ck("KVM_SET_XCRS", self.fd.set_xcrs(&s.xcrs))?;
        ck("KVM_SET_DEBUGREGS", self.fd.set_debug_regs(&s.debugregs))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("MSR list is small");
        let n = ck("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if n != entries.len() {
            return Err(VcpuError::PartialMsrs { written: n, wanted: entries.len() });
        }
        ck("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(&s.events))?;
        Ok(())
    }
}

// ---- kicking: make KVM_RUN return from another thread -----------------------

thread_local! {
    /// The kvm_run page of the vCPU that runs on this thread, for the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

static HANDLER: Once = Once::new();
static HANDLER_OK: AtomicBool = AtomicBool::new(false);

/// The real-time signal used for kicks.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    on_kick_signal(sig, info, ctx)
}

/// The kick handler's work, for other handlers that must also make KVM_RUN
/// return (the perf counter's overflow signal, clock::counter).
pub fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit closes the race where the signal lands just
    // before KVM_RUN is entered: KVM then returns EINTR at once.
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at this thread's mapped kvm_run page, which lives as
        // long as the Vcpu that registered it (it unregisters before dropping).
        // Only a raw pointer to the one field is formed (addr_of_mut!), never
        // a reference: the interrupted run loop may hold its own.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// Registers the kick handler once per process.
pub fn install_kick_handler() -> bool {
    HANDLER.call_once(|| {
        let ok = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).is_ok();
        HANDLER_OK.store(ok, Ordering::SeqCst);
    });
    HANDLER_OK.load(Ordering::SeqCst)
}

/// Threads that may be kicked now: (thread, generation), one entry per
/// live [`KickGuard`]. A kick signals a thread only while its entry is
/// here, checked under this lock; a guard removes its entry (under the
/// lock) before its thread can leave the run loop, let alone exit. So a
/// kicker never signals a thread that has exited (whose id may have been
/// reused), nor a later run of the same thread.
static KICKABLE: Mutex<Vec<(libc::pthread_t, u64)>> = Mutex::new(Vec::new());
static NEXT_GEN: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The generation of this thread's live KickGuard (0: none).
    static GEN: Cell<u64> = const { Cell::new(0) };
}

fn kickable() -> std::sync::MutexGuard<'static, Vec<(libc::pthread_t, u64)>> {
    KICKABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// While alive, kicks sent to this thread make this vCPU's KVM_RUN return.
pub struct KickGuard {
    gen: u64,
}

impl KickGuard {
    pub fn register(vcpu: &mut VcpuFd) -> KickGuard {
        install_kick_handler();
        let p: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(p));
        let gen = NEXT_GEN.fetch_add(1, Ordering::SeqCst);
        GEN.with(|g| g.set(gen));
        // SAFETY: pthread_self has no preconditions.
        kickable().push((unsafe { libc::pthread_self() }, gen));
        KickGuard { gen }
    }
}

impl Drop for KickGuard {
    fn drop(&mut self) {
        kickable().retain(|&(_, g)| g != self.gen);
        GEN.with(|g| g.set(0));
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// A handle another thread uses to kick the vCPU thread.
#[derive(Clone, Copy, Debug)]
pub struct Kicker {
    thread: libc::pthread_t,
    /// The KickGuard generation it was made under (0: none, never kicks).
    gen: u64,
}

impl Kicker {
    /// A kicker for the calling thread, valid while its KickGuard lives.
    pub fn current() -> Kicker {
        // SAFETY: pthread_self has no preconditions.
        Kicker { thread: unsafe { libc::pthread_self() }, gen: GEN.with(|g| g.get()) }
    }

    /// Signals the vCPU thread, if the run it was made for is still on;
    /// otherwise nothing (a kick for a finished run has nothing to stop).
    pub fn kick(&self) {
        let live = kickable();
        if self.gen != 0 && live.iter().any(|&(t, g)| g == self.gen && t == self.thread) {
            // SAFETY: the thread is alive: its KickGuard's entry is present
            // and is only removed, under this lock we hold, by that thread
            // itself before it can exit.
            unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        }
    }
}

// kvm-ioctls has no wrapper for KVM_INTERRUPT (it assumes an in-kernel irqchip).
vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_bindings::kvm_interrupt);

impl Vcpu {
    /// Queues external interrupt `vector` for delivery at the next KVM_RUN.
    /// Only valid without an in-kernel irqchip and when the guest can take it.
    pub fn inject_interrupt(&self, vector: u8) -> Result<(), VcpuError> {
        let irq = kvm_bindings::kvm_interrupt { irq: vector as u32 };
        // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which
        // is valid for the duration of the call; the fd is a vCPU fd.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq)
        };
        if ret < 0 {
            return Err(VcpuError::Kvm {
                op: "KVM_INTERRUPT",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod kick_tests {
    use super::*;

    /// A kicker outlives its run: once the guard is gone (and the thread
    /// with it) a kick signals nothing, instead of pthread_kill on a thread
    /// id that may have been reused.
    #[test]
    fn a_kicker_for_a_finished_run_signals_nothing() {
        let Ok(kvm) = Kvm::new() else { return };
        let vm = kvm.create_vm().expect("create VM");
        let mut fd = vm.create_vcpu(0).expect("create vCPU");
        let (k, gen) = std::thread::scope(|s| {
            s.spawn(|| {
                let g = KickGuard::register(&mut fd);
                let k = Kicker::current();
                assert!(kickable().iter().any(|&(_, x)| x == g.gen), "live while the guard is");
                // A live kick reaches this thread: the handler only sets immediate_exit.
                k.kick();
                (k, g.gen)
            })
            .join()
            .unwrap()
        });
        assert!(!kickable().iter().any(|&(_, x)| x == gen), "the guard's entry went with it");
        k.kick(); // must be a no-op now
    }
}
