//! A start-up step against a slow path of glibc's `memcpy` on AMD CPUs
//! with fast short `rep movsb` (FSRM): decision 75.
//!
//! On such CPUs glibc (2.36, Debian 12's) copies anything over about 2 KiB
//! with `rep movsb`, and `rep movsb` there runs at a twentieth of its speed
//! when the destination lies 1 to 63 bytes past the source modulo 4 KiB
//! (measured on this project's machine: 2.3 GB/s against 60 GB/s). That is
//! exactly where rustls seals a record: it copies plaintext from a
//! page-aligned buffer into a page-aligned record after its 5-byte header,
//! so with TLS a tenth of the engine's CPU went to that one copy. glibc
//! lets a process choose the size from which `rep movsb` is used
//! (`glibc.cpu.x86_rep_movsb_threshold`) only through the environment at
//! start, so on such a CPU `corral` starts itself again at once with that
//! threshold raised to 4 MiB: copies below it then use glibc's vector
//! loops, which have no such slow case (and 1 MiB copies and larger were
//! fast at every offset either way). An operator who set
//! the tunable already keeps their value; nothing changes elsewhere.

use std::ffi::OsString;

/// The tunable and the value corral asks for (4 MiB: above every size at
/// which the slow case showed on this project's machine).
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
const THRESHOLD: u64 = 4 << 20;

/// `GLIBC_TUNABLES` with corral's threshold added to what `current` holds,
/// or None when `current` already sets the threshold.
pub(crate) fn tunables_with_vector_copies(current: Option<&str>) -> Option<String> {
    let current = current.unwrap_or("");
    if current
        .split(':')
        .any(|t| t.split('=').next() == Some(TUNABLE))
    {
        return None;
    }
    let ours = format!("{TUNABLE}={THRESHOLD}");
    Some(if current.is_empty() {
        ours
    } else {
        format!("{current}:{ours}")
    })
}

/// True on an AMD CPU with fast short `rep movsb`, where glibc takes the
/// slow path described above.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn cpu_has_slow_short_distance_copies() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 0: the vendor and the highest leaf; leaf 7 is read only when
    // the CPU has it.
    let leaf0 = __cpuid_count(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    if &vendor != b"AuthenticAMD" || leaf0.eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    // CPUID.(EAX=7,ECX=0):EDX bit 4 is FSRM.
    leaf7.edx & (1 << 4) != 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn cpu_has_slow_short_distance_copies() -> bool {
    false
}

/// On a CPU with the slow copies, runs this program again (same pid,
/// arguments and descriptors) with the threshold in its environment; it
/// returns only when nothing needs doing or the exec failed, and then the
/// process carries on as it is.
pub(crate) fn restart_with_vector_copies() {
    if !cpu_has_slow_short_distance_copies() {
        return;
    }
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let Some(tunables) = tunables_with_vector_copies(current.as_deref()) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("corral"));
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    eprintln!("corral: could not restart with glibc's vector copies ({err}); going on without");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_added_to_what_the_environment_holds() {
        assert_eq!(
            tunables_with_vector_copies(None).as_deref(),
            Some("glibc.cpu.x86_rep_movsb_threshold=4194304")
        );
        assert_eq!(
            tunables_with_vector_copies(Some("")).as_deref(),
            Some("glibc.cpu.x86_rep_movsb_threshold=4194304")
        );
        assert_eq!(
            tunables_with_vector_copies(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4194304")
        );
    }

    #[test]
    fn an_operator_s_own_threshold_is_kept() {
        assert_eq!(
            tunables_with_vector_copies(Some("glibc.cpu.x86_rep_movsb_threshold=8192")),
            None
        );
        assert_eq!(
            tunables_with_vector_copies(Some(
                "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=8192"
            )),
            None
        );
        // A tunable whose name merely contains ours is another tunable.
        assert!(
            tunables_with_vector_copies(Some("glibc.cpu.x86_rep_movsb_threshold_x=1")).is_some()
        );
    }
}
