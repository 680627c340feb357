//! The host as the node plugin sees it: the commands it runs (`iscsiadm`,
//! `nbd-client`, `nbdfuse`, `losetup`, `blkid`, `mkfs.*`, `mount`), the
//! long-lived helpers it starts (`nbdfuse`), and the few files it reads
//! (`/proc/self/mountinfo`, `/sys/block/...`, device nodes). [`SystemHost`]
//! does them for real; [`RecordingHost`] records what would be run and
//! answers from a script, so the attach paths that need kernel modules
//! this machine lacks (iSCSI, NBD) are tested command by command.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a command printed and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn ok(stdout: &str) -> Self {
        CommandOutput {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn failed(code: i32, stderr: &str) -> Self {
        CommandOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A command that could not be run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({code}): {stderr}")]
    Failed {
        command: String,
        code: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut { what: String, after: Duration },
}

/// The host operations the node plugin needs.
pub trait Host: Send + Sync {
    /// Run a command to completion.
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError>;
    /// Start a long-lived helper in its own session (it outlives the
    /// plugin), output appended to `log`; returns its pid.
    fn spawn(&self, program: &str, args: &[&str], log: &Path) -> Result<u32, HostError>;
    /// Whether a path exists.
    fn exists(&self, path: &Path) -> bool;
    /// A file's text.
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// The names in a directory.
    fn list(&self, path: &Path) -> std::io::Result<Vec<String>>;
    /// Where a path (a symlink such as /dev/disk/by-path/...) leads.
    fn resolve(&self, path: &Path) -> std::io::Result<PathBuf>;
    /// Make a directory and its parents.
    fn make_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Send `signal` to `pid` (ignoring a process already gone).
    fn signal(&self, pid: u32, signal: i32);
    /// Wait `d` (a recording host returns at once).
    fn pause(&self, d: Duration);

    /// Run a command and fail unless it exits 0.
    fn run_ok(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let out = self.run(program, args)?;
        if out.success() {
            Ok(out)
        } else {
            Err(HostError::Failed {
                command: format!("{program} {}", args.join(" ")),
                code: out
                    .code
                    .map_or_else(|| "killed".to_string(), |c| format!("exit {c}")),
                stderr: out.stderr.trim().to_string(),
            })
        }
    }
}

/// Poll `check` every 100 ms until it is true or `limit` passes.
pub fn wait_for(
    host: &dyn Host,
    what: &str,
    limit: Duration,
    mut check: impl FnMut(&dyn Host) -> bool,
) -> Result<(), HostError> {
    let deadline = Instant::now() + limit;
    let most = limit.as_millis() / 100 + 1;
    let mut tries = 0u128;
    loop {
        if check(host) {
            return Ok(());
        }
        tries += 1;
        // Bounded in tries as well as time: a recording host's pause
        // takes no time.
        if Instant::now() >= deadline || tries > most {
            return Err(HostError::TimedOut {
                what: what.to_string(),
                after: limit,
            });
        }
        host.pause(Duration::from_millis(100));
    }
}

/// The real host.
#[derive(Clone, Debug, Default)]
pub struct SystemHost;

impl Host for SystemHost {
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        tracing::debug!(program, ?args, "running");
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| HostError::Spawn {
                program: program.to_string(),
                source,
            })?;
        Ok(CommandOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn spawn(&self, program: &str, args: &[&str], log: &Path) -> Result<u32, HostError> {
        use std::os::unix::process::CommandExt;
        let io = |source| HostError::Io {
            what: format!("log file {}", log.display()),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| HostError::Spawn {
            program: program.to_string(),
            source,
        })?;
        let pid = child.id();
        // Reap it in the background so it never lingers as a zombie while
        // this process lives; after a plugin restart, init reaps it.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        Ok(pid)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn list(&self, path: &Path) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn resolve(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    fn make_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn signal(&self, pid: u32, signal: i32) {
        if let Ok(pid) = i32::try_from(pid)
            && pid > 0
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, signal) };
        }
    }

    fn pause(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// One scripted answer of a [`RecordingHost`]: the first rule whose
/// program and argument prefix match a command answers it.
#[derive(Clone, Debug)]
pub struct Rule {
    pub program: String,
    pub args_prefix: Vec<String>,
    pub outputs: VecDeque<CommandOutput>,
}

/// A host that runs nothing: it records every command and answers from
/// its rules (a command no rule matches succeeds with no output); paths
/// "exist" once added, files read from a map.
#[derive(Debug, Default)]
pub struct RecordingHost {
    state: Mutex<Recorded>,
    hooks: Mutex<Hooks>,
}

/// What a command does to the recorded host besides being recorded (say,
/// `nbd-client` making a device's pid file appear).
type Hook = Arc<dyn Fn(&RecordingHost, &str, &[&str]) + Send + Sync>;

#[derive(Default)]
struct Hooks(Vec<Hook>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} hooks", self.0.len())
    }
}

#[derive(Debug, Default)]
struct Recorded {
    commands: Vec<String>,
    rules: Vec<Rule>,
    paths: BTreeSet<PathBuf>,
    files: Vec<(PathBuf, String)>,
    links: Vec<(PathBuf, PathBuf)>,
    next_pid: u32,
}

impl RecordingHost {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut state)
    }

    /// Answer commands starting with `program args_prefix...` with
    /// `outputs` in turn (the last one repeats).
    pub fn answer(&self, program: &str, args_prefix: &[&str], outputs: Vec<CommandOutput>) {
        self.with(|s| {
            s.rules.push(Rule {
                program: program.into(),
                args_prefix: args_prefix.iter().map(|a| a.to_string()).collect(),
                outputs: outputs.into(),
            })
        });
    }

    /// Call `hook` after every command is recorded and answered.
    pub fn after_run(&self, hook: impl Fn(&RecordingHost, &str, &[&str]) + Send + Sync + 'static) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.0.push(Arc::new(hook));
    }

    /// Make `path` exist.
    pub fn add_path(&self, path: impl Into<PathBuf>) {
        self.with(|s| s.paths.insert(path.into()));
    }

    /// Make `path` a file with `text`.
    pub fn add_file(&self, path: impl Into<PathBuf>, text: &str) {
        let path = path.into();
        self.with(|s| {
            s.paths.insert(path.clone());
            s.files.retain(|(p, _)| p != &path);
            s.files.push((path, text.to_string()));
        });
    }

    /// Make `from` a symlink to `to` (both then exist).
    pub fn add_link(&self, from: impl Into<PathBuf>, to: impl Into<PathBuf>) {
        let (from, to) = (from.into(), to.into());
        self.with(|s| {
            s.paths.insert(from.clone());
            s.paths.insert(to.clone());
            s.links.push((from, to));
        });
    }

    /// Every command so far, as `program arg arg...`.
    pub fn commands(&self) -> Vec<String> {
        self.with(|s| s.commands.clone())
    }

    /// Forget the commands recorded so far.
    pub fn clear(&self) {
        self.with(|s| s.commands.clear());
    }

    /// Record a command and answer it from the rules.
    fn answer_for(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        self.with(|s| {
            s.commands.push(format!("{program} {}", args.join(" ")));
            for rule in &mut s.rules {
                let matches = rule.program == program
                    && rule.args_prefix.len() <= args.len()
                    && rule.args_prefix.iter().zip(args).all(|(a, b)| a == b);
                if matches {
                    let out = if rule.outputs.len() > 1 {
                        rule.outputs.pop_front()
                    } else {
                        rule.outputs.front().cloned()
                    };
                    return Ok(out.unwrap_or_default());
                }
            }
            Ok(CommandOutput::ok(""))
        })
    }
}

impl Host for RecordingHost {
    fn run(&self, program: &str, args: &[&str]) -> Result<CommandOutput, HostError> {
        let out = self.answer_for(program, args);
        let hooks = self
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();
        for hook in hooks {
            hook(self, program, args);
        }
        out
    }

    fn spawn(&self, program: &str, args: &[&str], _log: &Path) -> Result<u32, HostError> {
        self.with(|s| {
            s.commands
                .push(format!("spawn {program} {}", args.join(" ")));
            s.next_pid += 1;
            Ok(100_000 + s.next_pid)
        })
    }

    fn exists(&self, path: &Path) -> bool {
        self.with(|s| s.paths.contains(path))
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.with(|s| {
            s.files
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        })
    }

    fn list(&self, path: &Path) -> std::io::Result<Vec<String>> {
        self.with(|s| {
            let mut names: Vec<String> = s
                .paths
                .iter()
                .filter(|p| p.parent() == Some(path))
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            names.sort();
            Ok(names)
        })
    }

    fn resolve(&self, path: &Path) -> std::io::Result<PathBuf> {
        self.with(|s| {
            s.links
                .iter()
                .find(|(from, _)| from == path)
                .map(|(_, to)| to.clone())
                .or_else(|| s.paths.contains(path).then(|| path.to_path_buf()))
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        })
    }

    fn make_dir(&self, path: &Path) -> std::io::Result<()> {
        self.with(|s| s.paths.insert(path.to_path_buf()));
        Ok(())
    }

    fn signal(&self, pid: u32, signal: i32) {
        self.with(|s| s.commands.push(format!("kill -{signal} {pid}")));
    }

    fn pause(&self, _d: Duration) {}
}
