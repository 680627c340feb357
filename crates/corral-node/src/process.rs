//! Engine processes at the operating-system level: starting `corral engine`
//! as a child in its own process group with its output appended to its log
//! file ([`Launcher`]), watching a child or an adopted process until it
//! ends ([`EngineProcess`]), telling an engine from an unrelated process
//! that reuses its pid (`/proc/PID/cmdline`), signals, and log tails.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::error::NodeError;
use crate::spec::{
    EngineAddresses, EngineSpec, LocalReplica, engine_command_line, is_engine_command_line,
    local_replica_args,
};
use crate::supervision::StopSignal;

/// A log grown past this is moved to `<volume>.log.1` before the next start.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// Starts engine processes.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The `corral` binary to run `engine` with.
    pub binary: PathBuf,
    /// The operator's extra engine arguments (`--engine-args`).
    pub extra_args: Vec<String>,
    /// Where `<volume>.log` files go.
    pub log_dir: PathBuf,
    /// This daemon's replica service and its unix socket: an engine whose
    /// replicas include it gets `--local-replica` (`None`: no socket).
    pub local_replica: Option<LocalReplica>,
}

/// A freshly started engine process.
pub struct Launched {
    pub child: tokio::process::Child,
    pub pid: u32,
    /// Where this process's output starts in its log file.
    pub log_offset: u64,
}

impl Launcher {
    /// The log file of `volume`'s engine.
    pub fn log_path(&self, volume: &str) -> PathBuf {
        self.log_dir.join(format!("{volume}.log"))
    }

    /// Start `spec`'s engine on `addrs`.
    pub fn spawn(&self, spec: &EngineSpec, addrs: &EngineAddresses) -> Result<Launched, NodeError> {
        std::fs::create_dir_all(&self.log_dir).map_err(|e| NodeError::io(&self.log_dir, e))?;
        let path = self.log_path(&spec.volume);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
            let mut old = path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&path, old);
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| NodeError::io(&path, e))?;
        let mut args = engine_command_line(spec, addrs, &self.extra_args);
        args.extend(local_replica_args(spec, self.local_replica.as_ref()));
        let log_offset = log
            .seek(SeekFrom::End(0))
            .map_err(|e| NodeError::io(&path, e))?;
        writeln!(
            log,
            "corral node: starting {} {}",
            self.binary.display(),
            args.join(" ")
        )
        .map_err(|e| NodeError::io(&path, e))?;
        let stderr = log.try_clone().map_err(|e| NodeError::io(&path, e))?;
        let child = tokio::process::Command::new(&self.binary)
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            // Its own process group: a Ctrl-C to the daemon's terminal must
            // not reach it, and the daemon's end must not end it.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| NodeError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let pid = child.id().ok_or_else(|| NodeError::Spawn {
            binary: self.binary.clone(),
            source: std::io::Error::other("the process ended before its pid was read"),
        })?;
        Ok(Launched {
            child,
            pid,
            log_offset,
        })
    }
}

/// An engine process being watched.
pub enum EngineProcess {
    /// Started by this daemon: waited for.
    Child {
        child: tokio::process::Child,
        pid: u32,
    },
    /// Started by an earlier daemon: polled.
    Adopted {
        pid: u32,
        volume: String,
        control: SocketAddr,
        poll: Duration,
    },
}

impl EngineProcess {
    pub fn pid(&self) -> u32 {
        match self {
            EngineProcess::Child { pid, .. } | EngineProcess::Adopted { pid, .. } => *pid,
        }
    }

    /// Wait until the process has ended; how it ended. Cancel-safe.
    pub async fn ended(&mut self) -> String {
        match self {
            EngineProcess::Child { child, .. } => match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("lost track of it: {e}"),
            },
            EngineProcess::Adopted {
                pid,
                volume,
                control,
                poll,
            } => {
                while is_our_engine(*pid, volume, *control) {
                    tokio::time::sleep(*poll).await;
                }
                "ended (status unknown: the process was adopted after a daemon restart)".into()
            }
        }
    }

    /// Send `signal` to the process. An adopted one is checked to still be
    /// the engine first, so that a reused pid is never signalled.
    pub fn signal(&self, signal: StopSignal) -> std::io::Result<()> {
        if let EngineProcess::Adopted {
            pid,
            volume,
            control,
            ..
        } = self
            && !is_our_engine(*pid, volume, *control)
        {
            return Ok(());
        }
        send_signal(self.pid(), signal)
    }
}

/// "exit status 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        None => format!("{status}"),
    }
}

/// Send a signal to process `pid` (ESRCH, no such process, is success).
pub fn send_signal(pid: u32, signal: StopSignal) -> std::io::Result<()> {
    let sig = match signal {
        StopSignal::Term => libc::SIGTERM,
        StopSignal::Kill => libc::SIGKILL,
    };
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Ok(());
    };
    if pid <= 0 {
        return Ok(());
    }
    // SAFETY: kill(2) with a positive pid signals that one process only.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// A process's command line (`None`: no such process, or a zombie).
pub fn command_line(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether process `pid` is alive and is the engine of `volume` on `control`.
pub fn is_our_engine(pid: u32, volume: &str, control: SocketAddr) -> bool {
    command_line(pid).is_some_and(|argv| is_engine_command_line(&argv, volume, control))
}

/// The last `max_lines` lines of the log at `path` written from `offset`
/// on (at most 8 KiB), for error messages.
pub fn log_tail(path: &Path, offset: u64, max_lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let from = offset.max(len.saturating_sub(8 << 10)).min(len);
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(max_lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described() {
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exit status 1");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn the_command_line_of_this_process_is_read() {
        let argv = command_line(std::process::id()).unwrap();
        assert!(!argv.is_empty());
        assert!(command_line(u32::MAX).is_none());
        let control: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!is_our_engine(std::process::id(), "v", control));
    }

    #[test]
    fn log_tails_start_at_the_offset_and_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        std::fs::write(&path, "old run\nline 1\nline 2\nline 3\n").unwrap();
        assert_eq!(log_tail(&path, 8, 2), "line 2\nline 3");
        assert_eq!(log_tail(&path, 8, 10), "line 1\nline 2\nline 3");
        assert!(log_tail(&dir.path().join("none"), 0, 3).contains("cannot read"));
    }

    #[tokio::test]
    async fn a_child_runs_in_its_own_process_group_and_its_exit_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = Launcher {
            binary: PathBuf::from("/bin/sh"),
            extra_args: vec![],
            log_dir: dir.path().to_path_buf(),
            local_replica: None,
        };
        // `/bin/sh engine --volume ...` fails: sh cannot open a script
        // named "engine". That is enough to see the plumbing work.
        let spec = crate::spec::EngineSpec::from_pb(&corral_proto::v1::EngineSpec {
            volume: "v".into(),
            size: 4096,
            replicas: vec!["127.0.0.1:1".into()],
            ..Default::default()
        })
        .unwrap();
        let addrs = EngineAddresses::assign("127.0.0.1".parse().unwrap(), &spec, &[1]).unwrap();
        let launched = launcher.spawn(&spec, &addrs).unwrap();
        // SAFETY: getpgid on a pid we just spawned (0 if it is gone already).
        let group = unsafe { libc::getpgid(launched.pid as libc::pid_t) };
        assert!(
            group == launched.pid as libc::pid_t || group == -1,
            "own group: {group}"
        );
        let mut process = EngineProcess::Child {
            child: launched.child,
            pid: launched.pid,
        };
        let how = process.ended().await;
        assert!(how.starts_with("exit status"), "{how}");
        let log = std::fs::read_to_string(launcher.log_path("v")).unwrap();
        assert!(
            log.contains("corral node: starting /bin/sh engine --volume v"),
            "{log}"
        );
        assert!(
            log.lines().count() >= 2,
            "the child's stderr is in the log: {log}"
        );
    }
}
