//! `lorafit train CONFIG --nproc-per-node N`: starts N copies of this command on this machine as
//! the ranks of one data-parallel run, like `torchrun --standalone`, and waits for them.

use anyhow::{Context, Result};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The variable that tells a worker how many share its machine (for its thread count).
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";

/// How long the other workers get to end on their own once one has failed (they normally
/// notice at their next collective, at once) before they are killed.
const GRACE: Duration = Duration::from_secs(30);

/// Runs `args` (this program's arguments without `--nproc-per-node`) as `n` workers meeting on
/// a free loopback port; returns the exit code of the run: 0, or the first failing worker's.
/// Ctrl-C (or SIGTERM) is passed on to every worker, which stop together with one checkpoint;
/// a second one kills them.
pub fn launch_local(n: usize, args: &[String]) -> Result<i32> {
    let port = free_port()?;
    let exe = std::env::current_exe().context("cannot find the lorafit executable to start workers")?;
    let signals = Arc::new(AtomicUsize::new(0));
    let counter = signals.clone();
    ctrlc::set_handler(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    })
    .context("cannot install the Ctrl-C handler of the launcher")?;
    let mut workers: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut command = Command::new(&exe);
        own_process_group_tied_to_launcher(&mut command);
        let child = command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env(LOCAL_WORLD_SIZE, n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .spawn();
        match child {
            Ok(child) => workers.push(child),
            Err(e) => {
                kill_all(&mut workers);
                return Err(e).with_context(|| format!("cannot start worker {rank} ({})", exe.display()));
            }
        }
    }
    Ok(supervise(&mut workers, &signals))
}

/// A worker gets Ctrl-C only through the launcher, once: a terminal sends it to its whole
/// foreground process group, and a worker that saw it twice would quit without a checkpoint.
/// And a worker dies with the launcher (kill -9 of it included), leaving no orphan behind.
fn own_process_group_tied_to_launcher(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid before the fork; the closure calls only async-signal-safe functions.
        let launcher = unsafe { libc::getpid() };
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The launcher died before the line above: nothing would signal this worker.
                if libc::getppid() != launcher {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}

/// Waits for every worker, passing signals on and ending the rest after one fails; the exit
/// code is the first failure's, which is also named on stderr (the other workers then fail
/// at their next exchange with the dead one, each saying only that a peer is gone).
fn supervise(workers: &mut [Child], signals: &AtomicUsize) -> i32 {
    let mut codes: Vec<Option<i32>> = vec![None; workers.len()];
    let (mut first_failure, mut failed_at, mut forwarded) = (None::<i32>, None::<Instant>, 0);
    while codes.iter().any(Option::is_none) {
        for (rank, child) in workers.iter_mut().enumerate() {
            if codes[rank].is_none() {
                if let Ok(Some(status)) = child.try_wait() {
                    // Killed by a signal: 128 + its number, as a shell reports it.
                    let code = status.code().unwrap_or_else(|| 128 + signal_of(&status));
                    codes[rank] = Some(code);
                    if code != 0 && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                        first_failure = Some(code);
                        if forwarded == 0 {
                            eprintln!(
                                "lorafit: {}; stopping the other workers",
                                ended(rank, child.id(), &status)
                            );
                        }
                    }
                }
            }
        }
        let received = signals.load(Ordering::SeqCst);
        if received > forwarded {
            forwarded = received;
            for (rank, child) in workers.iter_mut().enumerate() {
                if codes[rank].is_none() {
                    // The first signal asks for a checkpoint; a second one ends the workers now.
                    let sig = if received == 1 { libc::SIGINT } else { libc::SIGKILL };
                    // SAFETY: a plain kill(2) of our own child's pid.
                    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            kill_all(workers);
        } else if failed_at.is_some() {
            kill_stopped(workers);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // An interrupted run's 130 when every worker stopped so.
    first_failure.unwrap_or(0)
}

/// "rank 1 (pid 4242) was killed by signal 9", "rank 0 (pid 4241) exited with code 1".
fn ended(rank: usize, pid: u32, status: &std::process::ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("rank {rank} (pid {pid}) exited with code {code}"),
        None => format!("rank {rank} (pid {pid}) was killed by signal {}", signal_of(status)),
    }
}

fn signal_of(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.signal().unwrap_or(0)
}

fn kill_all(workers: &mut [Child]) {
    for child in workers.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
}

/// Once the run has failed, a stopped worker (SIGSTOP, or suspended by a debugger) cannot end on
/// its own: it is killed at once, named, rather than after the grace period.
fn kill_stopped(workers: &mut [Child]) {
    for (rank, child) in workers.iter_mut().enumerate() {
        if matches!(child.try_wait(), Ok(None)) && is_stopped(child.id()) {
            eprintln!("lorafit: rank {rank} (pid {}) is stopped; killing it", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the process is in the stopped state ('T' or 't' in /proc/PID/stat).
fn is_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may hold any character.
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.trim_start().chars().next())
        .is_some_and(|c| c == 'T' || c == 't')
}

/// A port on 127.0.0.1 nothing listens on now (the OS picks it); rank 0's store binds it a
/// moment later.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}
