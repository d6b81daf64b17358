//! Data-parallel training (Gloo on loopback) against the single process it must equal: 2 workers
//! × micro-batch 2 take the same examples per step as 1 process × micro-batch 2 × accumulation 2,
//! so the per-step losses and the final adapter agree to fp32 rounding.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// fp32 sums in another order: what the two may differ by.
const TOLERANCE: f64 = 1e-6;

struct Trained {
    losses: Vec<f64>,
    eval_loss: f64,
    adapter: BTreeMap<String, Vec<f32>>,
}

/// `lorafit train` of the shipped default config for `steps` steps of micro-batch 2 in
/// `dir/name` (`None`: a generated name), logging every step, with `args` added.
fn train_args(dir: &Path, name: Option<&str>, steps: usize, args: &[&str]) -> Vec<String> {
    let config = common::repo().join("configs/default.yaml");
    let mut all: Vec<String> =
        ["train", config.to_str().unwrap(), "--log-format", "json"].map(String::from).into();
    let max_steps = format!("train.max_steps={steps}");
    let out_dir = format!("output.dir={}", dir.display());
    for set in
        [&max_steps, "train.micro_batch_size=2", "train.log_every=1", "output.sample_prompts=[]", &out_dir]
    {
        all.extend(["--set".to_string(), set.to_string()]);
    }
    if let Some(name) = name {
        all.extend(["--set".to_string(), format!("output.run_name={name}")]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// Trains the shipped default config for 4 steps of 4 examples in `dir/name` with `args` added.
fn train(dir: &Path, name: &str, args: &[&str]) -> Trained {
    let all = train_args(dir, Some(name), 4, args);
    let out = common::lorafit(&common::repo(), &all.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    trained(&dir.join(name), &stdout)
}

/// The losses rank 0 logged (`stdout`, JSON lines) and the adapter it wrote in `run`.
fn trained(run: &Path, stdout: &str) -> Trained {
    let records: Vec<serde_json::Value> =
        stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let losses = records.iter().filter(|r| r["event"] == "train").map(|r| r["train/loss"].as_f64().unwrap());
    let eval_loss =
        records.iter().rev().find(|r| r["event"] == "eval").map(|r| r["eval/loss"].as_f64().unwrap());
    let bytes = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let adapter = tensors
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            (key, values.collect())
        })
        .collect();
    Trained { losses: losses.collect(), eval_loss: eval_loss.expect("an evaluation at the end"), adapter }
}

/// The single process with accumulation 2 against 2 workers, with `extra` settings on both.
fn assert_two_workers_equal_one(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    fn with<'a>(extra: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
        extra.iter().flat_map(|s| ["--set", s]).chain(args.iter().copied()).collect()
    }
    let one = train(tmp.path(), "one", &with(extra, &["--set", "train.grad_accum_steps=2"]));
    let two = train(tmp.path(), "two", &with(extra, &["--nproc-per-node", "2"]));
    assert_eq!(one.losses.len(), 4);
    assert_eq!(one.losses.len(), two.losses.len());
    for (step, (a, b)) in one.losses.iter().zip(&two.losses).enumerate() {
        assert!((a - b).abs() <= TOLERANCE, "step {}: loss {a} with 1 process, {b} with 2 workers", step + 1);
    }
    assert!((one.eval_loss - two.eval_loss).abs() <= TOLERANCE, "{} vs {}", one.eval_loss, two.eval_loss);
    assert_same_adapter(&one, &two);
    // And training moved the adapter: an equality of two untouched adapters would prove nothing.
    let initial_b_zero =
        one.adapter.iter().filter(|(k, _)| k.contains("lora_B")).all(|(_, v)| v.iter().all(|&x| x == 0.0));
    assert!(!initial_b_zero, "the adapters were not trained");
}

/// The single process with accumulation 2 against the two ranks `commands` start (rank 0
/// first; each gets the training arguments of a run named `name` in `dir`).
fn assert_ranks_equal_one_process(dir: &Path, name: &str, commands: Vec<std::process::Command>) {
    let one = train(dir, "one", &["--set", "train.threads=1", "--set", "train.grad_accum_steps=2"]);
    let args = train_args(dir, Some(name), 4, &["--set", "train.threads=1"]);
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut c| {
            let c = c.args(&args).current_dir(common::repo()).stdout(std::process::Stdio::piped());
            c.stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (rank, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "{name} rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let two = trained(&dir.join(name), &String::from_utf8_lossy(&outputs[0].stdout));
    assert_eq!(one.losses.len(), 4);
    assert_eq!(one.losses.len(), two.losses.len());
    for (step, (a, b)) in one.losses.iter().zip(&two.losses).enumerate() {
        assert!((a - b).abs() <= TOLERANCE, "step {}: loss {a} with 1 process, {b} with {name}", step + 1);
    }
    assert_same_adapter(&one, &two);
}

/// A free port on 127.0.0.1 (nothing listens on it once this returns).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Two "machines" on loopback: two torchrun invocations (`--nnodes 2`, one worker each, node
/// ranks 0 and 1; torchrun's agent on node 0 hosts the store) equal one process with
/// accumulation 2.
#[test]
fn torchrun_on_two_nodes_equals_one_process_with_accumulation() {
    let Some(python) = common::python() else { return };
    let torchrun = python.with_file_name("torchrun");
    assert!(torchrun.exists(), "no torchrun beside {}", python.display());
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let nodes = (0..2)
        .map(|node| {
            let mut c = std::process::Command::new(&torchrun);
            c.args(["--nnodes", "2", "--node-rank", &node.to_string(), "--nproc-per-node", "1"]);
            c.args(["--master-addr", "127.0.0.1", "--master-port", &port, "--no-python"]);
            c.arg(env!("CARGO_BIN_EXE_lorafit"));
            c
        })
        .collect();
    assert_ranks_equal_one_process(tmp.path(), "torchrun", nodes);
}

/// Two tasks as srun starts them (its environment, without srun): the Slurm variables give the
/// ranks, and the node list where rank 0 runs.
#[test]
fn slurm_tasks_equal_one_process_with_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let tasks = (0..2)
        .map(|task: usize| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"));
            c.env("SLURM_PROCID", task.to_string()).env("SLURM_LOCALID", task.to_string());
            c.env("SLURM_NTASKS", "2").env("SLURM_NTASKS_PER_NODE", "2").env("SLURM_NODELIST", "localhost");
            c.env("MASTER_PORT", &port).env_remove("MASTER_ADDR");
            c
        })
        .collect();
    assert_ranks_equal_one_process(tmp.path(), "slurm", tasks);
}

/// Slurm's variables map to the rendezvous: ranks, tasks per node ("2(x3)"), rank 0's host from
/// the step's node list, MASTER_ADDR over it, and the launch node without a list.
#[test]
fn slurm_environment_maps_to_the_rendezvous() {
    use lorafit::dist::Rendezvous;
    let with = |pairs: &[(&str, &str)]| {
        let vars: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Rendezvous::from_vars(|name| vars.get(name).cloned()).unwrap().unwrap()
    };
    let slurm = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "6"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "2(x3)"),
    ];
    let list =
        |l: &'static str| [&slurm[..], &[("SLURM_NODELIST", "x[1-9]"), ("SLURM_STEP_NODELIST", l)]].concat();
    let at = with(&list("gpu[03-05,9],cpu1"));
    assert_eq!((at.rank, at.world, at.local_rank, at.local_world), (5, 6, 1, 2));
    assert_eq!((at.master_addr.as_str(), at.master_port, at.agent_store), ("gpu03", 29500, false));
    assert_eq!(with(&list("n7,n8")).master_addr, "n7");
    assert_eq!(with(&list("solo")).master_addr, "solo");
    assert_eq!(with(&[&slurm[..], &[("SLURM_NODELIST", "a[10-11]")]].concat()).master_addr, "a10");
    let set = with(&[&list("n7"), &[("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")][..]].concat());
    assert_eq!((set.master_addr.as_str(), set.master_port), ("10.0.0.1", 1234));
    assert_eq!(
        with(&[&slurm[..], &[("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.9")]].concat()).master_addr,
        "10.0.0.9"
    );
}

fn assert_same_adapter(a: &Trained, b: &Trained) {
    assert_eq!(a.adapter.keys().collect::<Vec<_>>(), b.adapter.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (key, x) in &a.adapter {
        for (x, y) in x.iter().zip(&b.adapter[key]) {
            worst = worst.max((x - y).abs() as f64);
        }
    }
    assert!(worst <= TOLERANCE, "adapters differ by up to {worst}");
}

#[test]
fn two_workers_equal_one_process_with_accumulation() {
    assert_two_workers_equal_one(&["train.threads=1"]);
}

#[test]
fn two_workers_equal_one_process_with_packing_and_dropout() {
    assert_two_workers_equal_one(&["train.threads=1", "data.packing=true", "lora.dropout=0.1"]);
}

/// A rank whose peers never come ends within `train.dist_timeout`, saying which rank it is.
#[test]
fn a_rank_alone_gives_up_after_the_timeout_naming_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = common::repo().join("configs/default.yaml");
    let out_dir = format!("output.dir={}", tmp.path().display());
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(["train", config.to_str().unwrap(), "--set", "train.dist_timeout=3", "--set", &out_dir])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .current_dir(common::repo())
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(message.contains("rank 0 of 2"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "a run directory was written");
}

/// `from`'s run (4 steps, a checkpoint after 2) resumed from `step-2` on the other number of
/// workers, with the accumulation that keeps the step's examples, in a copy of its directory;
/// steps 3 and 4 and the adapter must be the uninterrupted run's.
fn assert_resumed_equals_uninterrupted(dir: &Path, from: &Trained, name: &str, resumed_args: &[&str]) {
    let copy = format!("{name}-resumed");
    copy_dir(&dir.join(name), &dir.join(&copy));
    let checkpoint = dir.join(&copy).join("step-2");
    let mut args = vec!["--set", "train.threads=1", "--set", "train.save_every=2", "--resume"];
    args.push(checkpoint.to_str().unwrap());
    args.extend(resumed_args);
    let resumed = train(dir, &copy, &args);
    assert_eq!(resumed.losses.len(), 2, "steps 3 and 4 only");
    for (step, (a, b)) in from.losses[2..].iter().zip(&resumed.losses).enumerate() {
        assert!((a - b).abs() <= TOLERANCE, "step {}: loss {a} uninterrupted, {b} resumed", step + 3);
    }
    assert!((from.eval_loss - resumed.eval_loss).abs() <= TOLERANCE);
    assert_same_adapter(from, &resumed);
}

#[test]
fn a_run_resumed_on_another_number_of_workers_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let common = ["--set", "train.threads=1", "--set", "train.save_every=2"];
    let two = train(tmp.path(), "two", &[&common[..], &["--nproc-per-node", "2"]].concat());
    assert_resumed_equals_uninterrupted(tmp.path(), &two, "two", &["--set", "train.grad_accum_steps=2"]);
    let one = train(tmp.path(), "one", &[&common[..], &["--set", "train.grad_accum_steps=2"]].concat());
    assert_resumed_equals_uninterrupted(tmp.path(), &one, "one", &["--nproc-per-node", "2"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A `--nproc-per-node 2` run in `dir`, of more steps than any test waits for, named `run_name`
/// (`None`: a generated name), started in its own process group as a shell starts a foreground
/// command; its stderr goes to `dir/<log>.stderr`.
fn start_two_workers(dir: &Path, run_name: Option<&str>, log: &str, extra: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut args = train_args(dir, run_name, 100_000, &["--set", "train.threads=1", "--nproc-per-node", "2"]);
    args.extend(extra.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
    let stderr = std::fs::File::create(dir.join(format!("{log}.stderr"))).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_lorafit"))
        .args(args)
        .current_dir(common::repo())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `condition`.
fn wait_for(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "no {what} after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The launcher's workers, by rank, once both have started (a child forked but not yet
/// running lorafit has no RANK yet).
fn workers_of(launcher: u32) -> Vec<i32> {
    let rank_of = |pid: &i32| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = environ.split(|&b| b == 0).find_map(|v| v.strip_prefix(b"RANK="))?;
        std::str::from_utf8(rank).ok()?.parse::<usize>().ok()
    };
    let ranked = || -> Option<Vec<i32>> {
        let list = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
        let mut pids: Vec<(usize, i32)> = list
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(|p| Some((rank_of(&p)?, p)))
            .collect::<Option<_>>()?;
        pids.sort();
        Some(pids.into_iter().map(|(_, pid)| pid).collect()).filter(|p: &Vec<i32>| p.len() == 2)
    };
    wait_for(Duration::from_secs(60), "two workers", || ranked().is_some());
    ranked().unwrap()
}

/// Whether `pid` has ended (a zombie has too).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The launcher's exit code, once it has ended within `limit` (else it and `workers` are killed).
fn exit_code(launcher: &mut std::process::Child, workers: &[i32], limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            return status.code().or(status.signal().map(|s| 128 + s));
        }
        if started.elapsed() > limit {
            for &pid in workers.iter().chain([&(launcher.id() as i32)]) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = launcher.wait();
            panic!("the launcher did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checkpoint directories of a run, by step.
fn checkpoints(run: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// SIGKILL of one worker: the launcher ends the run at once, naming that rank, no worker is
/// left, and the last checkpoint resumes.
#[test]
fn a_killed_worker_ends_the_run_naming_its_rank_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("killed");
    let mut launcher = start_two_workers(
        tmp.path(),
        Some("killed"),
        "killed",
        &["train.save_every=2", "train.dist_timeout=20"],
    );
    let workers = workers_of(launcher.id());
    wait_for(Duration::from_secs(300), "checkpoint", || run.join("step-2/trainer_state.json").exists());
    unsafe { libc::kill(workers[1], libc::SIGKILL) };
    let code = exit_code(&mut launcher, &workers, Duration::from_secs(60));
    let stderr = std::fs::read_to_string(tmp.path().join("killed.stderr")).unwrap();
    assert_eq!(code, Some(128 + libc::SIGKILL), "{stderr}");
    assert!(stderr.contains(&format!("rank 1 (pid {}) was killed by signal 9", workers[1])), "{stderr}");
    assert!(workers.iter().all(|&pid| gone(pid)), "a worker is left: {stderr}");
    assert_last_checkpoint_resumes(tmp.path(), "killed");
}

/// The last checkpoint of the run `dir/name` trains one more step on 1 worker, which takes the
/// step's 2 micro-batches by accumulation.
fn assert_last_checkpoint_resumes(dir: &Path, name: &str) {
    let run = dir.join(name);
    let last = *checkpoints(&run).last().expect("a checkpoint");
    let checkpoint = run.join(format!("step-{last}"));
    let mut args = train_args(dir, Some(name), last + 1, &["--set", "train.grad_accum_steps=2", "--resume"]);
    args.push(checkpoint.display().to_string());
    let out = common::lorafit(&common::repo(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "resuming {}: {}",
        checkpoint.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hung worker (SIGSTOP, which it cannot catch): the other one gives up within
/// `train.dist_timeout` (and a few seconds to ask the store), naming the rank it waited for; the
/// launcher kills the stopped worker at once; no process is left and the last checkpoint
/// resumes.
#[test]
fn a_hung_worker_ends_the_run_within_the_timeout_naming_its_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("hung");
    let timeout = 5;
    let settings = ["train.save_every=2".to_string(), format!("train.dist_timeout={timeout}")];
    let mut launcher = start_two_workers(
        tmp.path(),
        Some("hung"),
        "hung",
        &settings.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let workers = workers_of(launcher.id());
    wait_for(Duration::from_secs(300), "checkpoint", || run.join("step-2/trainer_state.json").exists());
    unsafe { libc::kill(workers[1], libc::SIGSTOP) };
    let stopped = Instant::now();
    let code = exit_code(&mut launcher, &workers, Duration::from_secs(120));
    let took = stopped.elapsed();
    let stderr = std::fs::read_to_string(tmp.path().join("hung.stderr")).unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("rank 0 of 2: all-reduce: "), "{stderr}");
    // Stopped before or inside the exchange rank 0 waits in: named either way.
    assert!(stderr.contains("waited for rank 1 ("), "{stderr}");
    assert!(stderr.contains(&format!("rank 1 (pid {}) is stopped; killing it", workers[1])), "{stderr}");
    // The timeout, the store's answer, and at most a step of rank 0's before it waits.
    assert!(
        took < Duration::from_secs(timeout + 15),
        "the run ended {took:?} after the worker hung: {stderr}"
    );
    assert!(workers.iter().all(|&pid| gone(pid)), "a worker is left: {stderr}");
    assert_last_checkpoint_resumes(tmp.path(), "hung");
}

/// Ctrl-C in the terminal of a `--nproc-per-node` run (SIGINT to its process group): every
/// worker stops after the same step, rank 0 writes one checkpoint, no process is left. The run
/// has a generated name, which every worker's message gives as rank 0 made it.
#[test]
fn ctrl_c_on_the_launcher_stops_every_worker_with_one_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut launcher = start_two_workers(tmp.path(), None, "stopped", &[]);
    let workers = workers_of(launcher.id());
    // The one run directory (the data cache is a hidden one beside it).
    let run = || {
        let entries = std::fs::read_dir(tmp.path()).unwrap().flatten();
        entries.map(|e| e.path()).find(|p| p.is_dir() && p.join("config.yaml").exists())
    };
    wait_for(Duration::from_secs(300), "first step", || {
        run().is_some_and(|r| {
            std::fs::read_to_string(r.join("metrics.jsonl")).is_ok_and(|m| m.contains("train/loss"))
        })
    });
    unsafe { libc::kill(-(launcher.id() as i32), libc::SIGINT) };
    let code = exit_code(&mut launcher, &workers, Duration::from_secs(120));
    let stderr = std::fs::read_to_string(tmp.path().join("stopped.stderr")).unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    let run = run().unwrap();
    let saved = checkpoints(&run);
    assert_eq!(saved.len(), 1, "{saved:?}: {stderr}");
    let checkpoint = run.join(format!("step-{}", saved[0]));
    assert!(checkpoint.join("trainer_state.json").exists());
    let said = format!("interrupted after step {}; checkpoint {} saved", saved[0], checkpoint.display());
    assert_eq!(stderr.matches(&said).count(), 2, "each worker names the checkpoint: {stderr}");
    assert!(workers.iter().all(|&pid| gone(pid)), "a worker is left: {stderr}");
}

/// The launcher killed outright (SIGKILL, which it cannot pass on): its workers end with it.
#[test]
fn workers_end_with_a_killed_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let mut launcher = start_two_workers(tmp.path(), Some("orphans"), "orphans", &[]);
    let workers = workers_of(launcher.id());
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let ended = Instant::now();
    while !workers.iter().all(|&pid| gone(pid)) && ended.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<i32> = workers.iter().copied().filter(|&pid| !gone(pid)).collect();
    for &pid in &left {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(left.is_empty(), "workers {left:?} outlived their launcher");
}

/// A DPO run's training metrics (`rewards/*`, `logps/*`) and validation metrics are those of
/// every rank's pairs, not rank 0's: 2 workers log what 1 process with accumulation 2 logs.
#[test]
fn two_workers_log_the_preference_metrics_of_every_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_pairs(&dir.join("pairs.jsonl"), 8);
    let yaml = format!(
        "model: {{path: {}}}\n\
         lora: {{r: 4, alpha: 8, dropout: 0.0}}\n\
         data: {{train: {pairs}, validation: {pairs}, format: alpaca, packing: false, shuffle: false}}\n\
         train: {{objective: dpo, max_steps: 2, micro_batch_size: 2, lr: 0.01, precision: fp32, threads: 1, log_every: 1}}\n\
         output: {{dir: {}, sample_prompts: []}}\n",
        common::repo().join("data/default-model").display(),
        dir.join("runs").display(),
        pairs = dir.join("pairs.jsonl").display(),
    );
    common::write(&dir.join("dpo.yaml"), &yaml);
    let records = |name: &str, args: &[&str]| -> Vec<serde_json::Value> {
        let run_name = format!("output.run_name={name}");
        let all = [&["train", "dpo.yaml", "--log-format", "json", "--set", &run_name as &str], args].concat();
        let out = common::lorafit(dir, &all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{name}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let one = records("one", &["--set", "train.grad_accum_steps=2"]);
    let two = records("two", &["--nproc-per-node", "2"]);
    let metric_names =
        ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"];
    let eval_names = ["eval/loss", "eval/rewards/chosen", "eval/rewards/accuracies", "eval/logps/rejected"];
    let pick = |records: &[serde_json::Value], event: &str, names: &[&str]| -> Vec<f64> {
        let of_event = records.iter().filter(|r| r["event"] == event);
        of_event
            .flat_map(|r| names.iter().map(|n| r[*n].as_f64().expect("a logged metric")).collect::<Vec<_>>())
            .collect()
    };
    for (event, names) in [("train", &metric_names[..]), ("eval", &eval_names[..])] {
        let (a, b) = (pick(&one, event, names), pick(&two, event, names));
        assert!(!a.is_empty() && a.len() == b.len(), "{event}: {a:?} vs {b:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= TOLERANCE, "{event}: 1 process logs {a:?}, 2 workers {b:?}");
        }
    }
}
