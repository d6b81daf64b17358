//! Data-parallel training across processes and machines on libtorch's own c10d engine: a
//! `TCPStore` rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, reached through the small
//! C++ shim in `shim.cpp` that build.rs compiles. Which process this is comes from the
//! environment a launcher sets ([`Rendezvous::from_env`]): `lorafit train --nproc-per-node`,
//! torchrun, or Slurm's srun.

mod launch;

pub use launch::{launch_local, LOCAL_WORLD_SIZE};

use anyhow::{bail, Context, Result};
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Where this process sits in a data-parallel run, and where the group meets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// This process's rank among those on its machine, and their number.
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// A launcher (torchrun's agent) already hosts the store: every rank connects as a client.
    pub agent_store: bool,
}

/// The store key prefix of each rank's progress mark (the rank is appended): `2n − 1` once the
/// rank has entered its n-th exchange, `2n` once it has finished it.
const MARK_KEY: &str = "reached/";

/// How long a failed exchange waits at most for the store to say which ranks it waited for.
const DIAGNOSIS_TIMEOUT: Duration = Duration::from_secs(3);

/// The port Slurm runs meet on when MASTER_PORT is not set (torchrun's default too).
const DEFAULT_PORT: u16 = 29500;

impl Rendezvous {
    /// The rendezvous the environment describes: torchrun's (and `--nproc-per-node`'s) `RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
    /// `TORCHELASTIC_USE_AGENT_STORE`; else Slurm's `SLURM_PROCID`, `SLURM_NTASKS`,
    /// `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` with MASTER_ADDR defaulting to the first node of
    /// `SLURM_STEP_NODELIST` or `SLURM_NODELIST` (where rank 0 runs), else the node srun was
    /// launched from. `None`: a single process (a world of one outside torchrun).
    pub fn from_env() -> Result<Option<Rendezvous>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Rendezvous::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| v.trim().parse::<usize>().with_context(|| format!("{name}={v:?} is not a number")))
                .transpose()
        };
        let torchrun = var("RANK").is_some() || var("WORLD_SIZE").is_some();
        let (rank, world, local_rank, local_world, default_addr) = if torchrun {
            let world = number("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not")?;
            let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local_world = number("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            (rank, world, number("LOCAL_RANK")?.unwrap_or(rank), local_world, None)
        } else if var("SLURM_PROCID").is_some() && var("SLURM_NTASKS").is_some() {
            let world = number("SLURM_NTASKS")?.unwrap_or(1);
            // "4" or "4(x2)": the tasks on each node.
            let per_node = var("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split('(').next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(world);
            let rank = number("SLURM_PROCID")?.unwrap_or(0);
            // Rank 0 runs on the first node of the step.
            let first_node = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_NODELIST"));
            let rank0_host =
                first_node.and_then(|list| first_slurm_host(&list)).or(var("SLURM_LAUNCH_NODE_IPADDR"));
            (rank, world, number("SLURM_LOCALID")?.unwrap_or(0), per_node, rank0_host)
        } else {
            return Ok(None);
        };
        // Under torchrun even one process joins its group of one, as a PyTorch script does
        // (with NCCL, the one-GPU check of that path); a single Slurm task trains alone.
        if world == 0 || (world == 1 && !torchrun) {
            return Ok(None);
        }
        if rank >= world || local_rank >= local_world.max(1) {
            bail!("rank {rank} (local {local_rank}) is outside a world of {world} ({local_world} on this machine)");
        }
        let master_addr = var("MASTER_ADDR")
            .or(default_addr)
            .context("a data-parallel run needs MASTER_ADDR: the address of the machine of rank 0")?;
        let master_port = match var("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
            None => DEFAULT_PORT,
        };
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(Some(Rendezvous { rank, world, local_rank, local_world, master_addr, master_port, agent_store }))
    }
}

/// The first host of a Slurm node list: "gpu[03-05,9],cpu1" gives "gpu03".
fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    let (name, rest) = list.split_at(list.find([',', '[']).unwrap_or(list.len()));
    let host = match rest.strip_prefix('[') {
        Some(ranges) => format!("{name}{}", ranges.split([',', '-', ']']).next()?),
        None => name.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

/// The collective operations of this lorafit build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// The backend for tensors on `device`: NCCL on a CUDA GPU, Gloo on the CPU.
    pub fn for_device(device: tch::Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A joined process group; leaves it when dropped.
pub struct Group {
    handle: *mut c_void,
    pub rank: usize,
    pub world: usize,
    /// NCCL's GPU, where tensors from elsewhere are staged for a collective; `None` on Gloo.
    staging: Option<tch::Device>,
    /// Where the group met: a failed exchange reads the ranks' progress from its store.
    at: Rendezvous,
    /// The exchanges (collectives) this rank has entered, marked in the store as it enters each.
    exchanges: AtomicU64,
    /// How long a failed exchange's diagnosis waits for the store.
    diagnosis_timeout: Duration,
    /// Nanoseconds spent inside [`Group::all_reduce_sum`] so far (waiting for the other ranks
    /// included): what the benchmark reports as the all-reduce share of a step. Two clock reads
    /// per collective, against milliseconds of network work.
    all_reduce_ns: AtomicU64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world)
    }
}

// The c10d process group is used from one thread at a time (the training loop); moving it
// between threads is safe.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    /// Joins the group `at` describes; fails after `timeout` when the others do not come.
    pub fn join(at: &Rendezvous, backend: Backend, timeout: Duration) -> Result<Group> {
        if !ffi::BUILT {
            bail!(
                "this lorafit was built without data-parallel training (gloo's headers were missing): \
                 run scripts/setup/gloo.sh and rebuild"
            );
        }
        if backend == Backend::Nccl && !ffi::has_nccl() {
            bail!("this lorafit was built without NCCL (it needs a CUDA libtorch and NCCL's headers)");
        }
        let addr = CString::new(at.master_addr.as_str()).context("MASTER_ADDR holds a NUL byte")?;
        let (device_kind, device_arg) = gloo_device(at);
        let device_arg = CString::new(device_arg).context("GLOO_SOCKET_IFNAME holds a NUL byte")?;
        let backend_name = CString::new(backend.name()).expect("no NUL");
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        // SAFETY: the strings live across the call; the shim copies them.
        let handle = unsafe {
            ffi::init(
                at.rank as c_int,
                at.world as c_int,
                addr.as_ptr(),
                at.master_port as c_int,
                at.agent_store as c_int,
                backend_name.as_ptr(),
                timeout_ms,
                device_kind,
                device_arg.as_ptr(),
            )
        };
        if handle.is_null() {
            bail!(
                "rank {} of {} could not join the group at {}:{}: {}",
                at.rank,
                at.world,
                at.master_addr,
                at.master_port,
                last_error()
            );
        }
        let staging = (backend == Backend::Nccl).then_some(tch::Device::Cuda(at.local_rank));
        Ok(Group {
            handle,
            rank: at.rank,
            world: at.world,
            staging,
            at: at.clone(),
            exchanges: AtomicU64::new(0),
            diagnosis_timeout: timeout.min(DIAGNOSIS_TIMEOUT),
            all_reduce_ns: AtomicU64::new(0),
        })
    }

    /// Sums `tensors` (one dtype and device) across the group in place, in one collective.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        let exchange = self.enter();
        let started = Instant::now();
        let rc = self.staged(tensors, |ptrs| {
            // SAFETY: the tensors outlive the call; the shim writes into their storage only.
            unsafe { ffi::all_reduce_sum(self.handle, ptrs.as_ptr(), ptrs.len()) }
        });
        let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.all_reduce_ns.fetch_add(spent, Ordering::Relaxed);
        self.check(rc, exchange)
    }

    /// Runs the collective `op` on `tensors`' storage. NCCL works only on its GPU: tensors
    /// elsewhere (the CPU's token counts, stop flag, run directory name) are copied there for
    /// the collective and back.
    fn staged(&self, tensors: &[Tensor], op: impl FnOnce(&[*mut c_void]) -> c_int) -> c_int {
        let away = |t: &Tensor| self.staging.is_some_and(|device| t.device() != device);
        let moved: Vec<Tensor> = match self.staging {
            Some(device) if tensors.iter().any(away) => tensors.iter().map(|t| t.to_device(device)).collect(),
            _ => tensors.iter().map(Tensor::shallow_clone).collect(),
        };
        let ptrs: Vec<*mut c_void> = moved.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let rc = op(&ptrs);
        if rc == 0 {
            for (t, m) in tensors.iter().zip(&moved).filter(|(t, _)| away(t)) {
                t.shallow_clone().copy_(m);
            }
        }
        rc
    }

    /// The time spent inside [`Group::all_reduce_sum`] since the group was joined.
    pub fn all_reduce_time(&self) -> Duration {
        Duration::from_nanos(self.all_reduce_ns.load(Ordering::Relaxed))
    }

    /// Replaces `tensors` with rank `root`'s.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let exchange = self.enter();
        let rc = self.staged(tensors, |ptrs| {
            // SAFETY: as in all_reduce_sum.
            unsafe { ffi::broadcast(self.handle, ptrs.as_ptr(), ptrs.len(), root as c_int) }
        });
        self.check(rc, exchange)
    }

    /// Rank `root`'s `bytes` on every rank (what the others pass is ignored).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        let len = Tensor::from_slice(&[bytes.len() as i64]);
        self.broadcast(std::slice::from_ref(&len), root)?;
        let shared = if self.rank == root {
            Tensor::from_slice(bytes)
        } else {
            Tensor::zeros([len.int64_value(&[0])], (tch::Kind::Uint8, tch::Device::Cpu))
        };
        self.broadcast(std::slice::from_ref(&shared), root)?;
        Vec::<u8>::try_from(&shared).context("reading broadcast bytes")
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        let exchange = self.enter();
        // SAFETY: a live handle.
        let rc = unsafe { ffi::barrier(self.handle) };
        self.check(rc, exchange)
    }

    /// Marks in the store that this rank enters its next exchange, and returns its number.
    fn enter(&self) -> u64 {
        let exchange = self.exchanges.fetch_add(1, Ordering::Relaxed) + 1;
        self.mark(2 * exchange as i64 - 1);
        exchange
    }

    /// Writes this rank's progress mark (see [`MARK_KEY`]). A mark that fails is left out: the
    /// exchange itself then fails and says why.
    fn mark(&self, value: i64) {
        let key = CString::new(format!("{MARK_KEY}{}", self.rank)).expect("no NUL");
        // SAFETY: a live handle; the key lives across the call.
        unsafe { ffi::mark(self.handle, key.as_ptr(), value) };
    }

    /// Marks a finished exchange, or the error of a failed one, naming the ranks it waited for.
    fn check(&self, rc: c_int, exchange: u64) -> Result<()> {
        if rc == 0 {
            self.mark(2 * exchange as i64);
            return Ok(());
        }
        let error = last_error();
        bail!("rank {} of {}: {error}; {}", self.rank, self.world, self.waited_for(exchange))
    }

    /// Which ranks never finished `exchange` (never entered it, or entered and stopped inside),
    /// from the marks in the store, read through a new connection that gives up after a few
    /// seconds (the store lives in rank 0 unless a launcher hosts it).
    fn waited_for(&self, exchange: u64) -> String {
        let mut marks = vec![0i64; self.world];
        let addr = CString::new(self.at.master_addr.as_str()).expect("checked when joining");
        let key = CString::new(MARK_KEY).expect("no NUL");
        let timeout_ms = i64::try_from(self.diagnosis_timeout.as_millis()).unwrap_or(i64::MAX);
        // SAFETY: the strings and `marks` (world entries) live across the call.
        let rc = unsafe {
            let port = self.at.master_port as c_int;
            ffi::read_marks(
                addr.as_ptr(),
                port,
                key.as_ptr(),
                self.world as c_int,
                timeout_ms,
                marks.as_mut_ptr(),
            )
        };
        let store = format!("the store at {}:{}", self.at.master_addr, self.at.master_port);
        if rc != 0 {
            let host = if self.at.agent_store { "the launcher" } else { "rank 0" };
            return format!("{store} does not answer either ({host} hosts it: it has probably hung or died)");
        }
        let entered = 2 * exchange as i64 - 1;
        let behind: Vec<String> = (marks.iter().enumerate())
            .filter(|&(rank, &mark)| rank != self.rank && mark <= entered)
            .map(|(rank, &mark)| match mark {
                m if m == entered => format!("rank {rank} (inside exchange {exchange})"),
                m => format!("rank {rank} (at exchange {})", (m + 1) / 2),
            })
            .collect();
        if behind.is_empty() {
            return format!(
                "every rank finished exchange {exchange}: another rank has probably failed after it; its own message says why"
            );
        }
        format!(
            "waited for {} to finish exchange {exchange}: it has hung, stopped, died or failed in it",
            behind.join(" and ")
        )
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the handle came from init and is dropped once.
        unsafe { ffi::destroy(self.handle) }
    }
}

/// Gloo's network device: loopback runs bind 127.0.0.1; GLOO_SOCKET_IFNAME picks an interface
/// as it does for PyTorch; otherwise the address this host's name resolves to.
fn gloo_device(at: &Rendezvous) -> (c_int, String) {
    if let Some(ifname) = std::env::var("GLOO_SOCKET_IFNAME").ok().filter(|s| !s.is_empty()) {
        return (1, ifname);
    }
    let loopback = at.master_addr == "localhost"
        || at.master_addr.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        (0, "127.0.0.1".to_string())
    } else {
        (2, String::new())
    }
}

fn last_error() -> String {
    if !ffi::BUILT {
        return String::new();
    }
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(ffi::last_error()) }.to_string_lossy().into_owned()
}

#[cfg(lorafit_dist)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    pub const BUILT: bool = true;
    extern "C" {
        #[link_name = "lorafit_dist_init"]
        pub fn init(
            rank: c_int,
            world: c_int,
            addr: *const c_char,
            port: c_int,
            agent_store: c_int,
            backend: *const c_char,
            timeout_ms: i64,
            device_kind: c_int,
            device_arg: *const c_char,
        ) -> *mut c_void;
        #[link_name = "lorafit_dist_all_reduce_sum"]
        pub fn all_reduce_sum(handle: *mut c_void, tensors: *const *mut c_void, n: usize) -> c_int;
        #[link_name = "lorafit_dist_broadcast"]
        pub fn broadcast(handle: *mut c_void, tensors: *const *mut c_void, n: usize, root: c_int) -> c_int;
        #[link_name = "lorafit_dist_mark"]
        pub fn mark(handle: *mut c_void, key: *const c_char, exchange: i64) -> c_int;
        #[link_name = "lorafit_dist_read_marks"]
        pub fn read_marks(
            addr: *const c_char,
            port: c_int,
            key_prefix: *const c_char,
            world: c_int,
            timeout_ms: i64,
            exchanges: *mut i64,
        ) -> c_int;
        #[link_name = "lorafit_dist_barrier"]
        pub fn barrier(handle: *mut c_void) -> c_int;
        #[link_name = "lorafit_dist_destroy"]
        pub fn destroy(handle: *mut c_void);
        #[link_name = "lorafit_dist_last_error"]
        pub fn last_error() -> *const c_char;
        #[link_name = "lorafit_dist_has_nccl"]
        fn has_nccl_raw() -> c_int;
    }
    pub fn has_nccl() -> bool {
        // SAFETY: no arguments, no state.
        unsafe { has_nccl_raw() != 0 }
    }
}

/// Without the shim: the same names, never called past [`Group::join`]'s check.
#[cfg(not(lorafit_dist))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    pub const BUILT: bool = false;
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn init(
        _: c_int,
        _: c_int,
        _: *const c_char,
        _: c_int,
        _: c_int,
        _: *const c_char,
        _: i64,
        _: c_int,
        _: *const c_char,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn all_reduce_sum(_: *mut c_void, _: *const *mut c_void, _: usize) -> c_int {
        -1
    }
    pub unsafe fn broadcast(_: *mut c_void, _: *const *mut c_void, _: usize, _: c_int) -> c_int {
        -1
    }
    pub unsafe fn barrier(_: *mut c_void) -> c_int {
        -1
    }
    pub unsafe fn mark(_: *mut c_void, _: *const c_char, _: i64) -> c_int {
        -1
    }
    pub unsafe fn read_marks(
        _: *const c_char,
        _: c_int,
        _: *const c_char,
        _: c_int,
        _: i64,
        _: *mut i64,
    ) -> c_int {
        -1
    }
    pub unsafe fn destroy(_: *mut c_void) {}
    pub unsafe fn last_error() -> *const c_char {
        c"".as_ptr()
    }
    pub fn has_nccl() -> bool {
        false
    }
}
