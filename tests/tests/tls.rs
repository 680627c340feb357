//! Stories about mutual TLS on the gRPC hops (issue 14): a volume whose
//! every hop runs TLS, each refusal a listener or a client makes (no
//! certificate, another CA's, an expired one, a server of another CA), an
//! engine without a certificate that cannot fence the serving one, and
//! certificates rotated under running processes.

use std::path::Path;
use std::time::Duration;

use corral_tests::tools::random_file;
use corral_tests::{Cluster, EngineSpec, corral_bin, poll, run_bounded};
use corral_tls::TlsFiles;
use corral_tls::pki::{Pki, Validity};

const MIB: usize = 1 << 20;

/// Write an identity signed by `pki` under `dir` as `<tag>.pem`,
/// `<tag>-key.pem`, trusting `ca` (a path written by the caller).
fn identity(dir: &Path, tag: &str, pki: &Pki, validity: Validity) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{tag}.pem")),
        key: dir.join(format!("{tag}-key.pem")),
        ca: dir.join(format!("{tag}-ca.pem")),
    };
    pki.issue(tag, &["127.0.0.1", "localhost"], validity)
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    pki.write_ca(&files.ca).unwrap();
    files
}

/// A cluster whose processes all use one identity of a fresh CA.
fn tls_cluster(replicas: usize) -> (Cluster, Pki, TlsFiles) {
    let mut cluster = Cluster::new().unwrap();
    let pki = Pki::new("test cluster CA").unwrap();
    let files = identity(cluster.path(), "cluster", &pki, Validity::Days(1));
    cluster.with_tls(&files);
    for _ in 0..replicas {
        cluster.start_replica().unwrap();
    }
    (cluster, pki, files)
}

/// `corral volume --engine E info` with exactly `flags` (not the
/// cluster's): its exit status and stderr.
fn volume_info_with(cluster: &Cluster, engine: usize, flags: &[String]) -> (bool, String) {
    let control = cluster.engines[engine].control.to_string();
    let out = run_bounded(
        std::process::Command::new(corral_bin())
            .args(["volume", "--engine", &control, "info"])
            .args(flags),
        Duration::from_secs(60),
    )
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A libnbd certificates directory (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`) holding `files`.
fn libnbd_dir(files: &TlsFiles, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(&files.ca, dir.join("ca-cert.pem")).unwrap();
    std::fs::copy(&files.cert, dir.join("client-cert.pem")).unwrap();
    std::fs::copy(&files.key, dir.join("client-key.pem")).unwrap();
    dir.display().to_string()
}

/// `nbdinfo --size URI`: the size, or stderr.
fn nbd_size(uri: &str) -> Result<u64, String> {
    let out = run_bounded(
        std::process::Command::new("nbdinfo").args(["--size", uri]),
        Duration::from_secs(30),
    )
    .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_volume_runs_with_mutual_tls_on_every_hop() {
    let (mut cluster, _pki, _files) = tls_cluster(3);
    let e = cluster
        .start_engine(&EngineSpec::new("tls", "16MiB", &[0, 1, 2]))
        .unwrap();
    let src = cluster.path().join("src");
    let data = random_file(&src, 8 * MIB, 7).unwrap();
    cluster.write_flushed(e, &src).unwrap();
    assert!(
        cluster.read_back(e, data.len()).unwrap() == data,
        "data reads back"
    );
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");
    cluster.verify(e).expect("the replicas are identical");

    // The same control service, asked in plain TCP, does not answer.
    let (ok, stderr) = volume_info_with(&cluster, e, &[]);
    assert!(!ok, "a plaintext client was served");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let log = cluster.engines[e].process.log_text();
    assert!(log.contains("not a TLS client"), "{log}");
}

#[test]
fn every_refusal_is_clear() {
    let (mut cluster, pki, good) = tls_cluster(1);
    let e = cluster
        .start_engine(&EngineSpec::new("refusals", "8MiB", &[0]).arg("--nbd-tls", "require"))
        .unwrap();
    let dir = cluster.path().to_path_buf();

    // The NBD frontend, told to require TLS: a plain client is refused, a
    // client with the cluster's certificate is served.
    let nbd = cluster.engines[e].nbd;
    let err = nbd_size(&format!("nbd://{nbd}/refusals")).unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    let certs = libnbd_dir(&good, &dir.join("libnbd"));
    let size = nbd_size(&format!("nbds://{nbd}/refusals?tls-certificates={certs}")).unwrap();
    assert_eq!(size, 8 << 20);
    let refusals_before = |cluster: &Cluster| {
        cluster.engines[e]
            .process
            .log_text()
            .matches("refused a connection")
            .count()
    };

    // A client of another CA, trusting the cluster's CA: the engine
    // refuses it.
    let other = Pki::new("another CA").unwrap();
    let mut intruder = identity(&dir, "intruder", &other, Validity::Days(1));
    intruder.ca = good.ca.clone();
    let before = refusals_before(&cluster);
    let (ok, _) = volume_info_with(&cluster, e, &TlsFiles::flags(&intruder));
    assert!(!ok, "a certificate of another CA was accepted");
    assert!(refusals_before(&cluster) > before, "the engine logged it");

    // An expired certificate of the right CA: refused, and the log says why.
    let expired = identity(&dir, "expired", &pki, Validity::Expired);
    let (ok, _) = volume_info_with(&cluster, e, &TlsFiles::flags(&expired));
    assert!(!ok, "an expired certificate was accepted");
    let log = cluster.engines[e].process.log_text();
    assert!(log.to_lowercase().contains("expired"), "{log}");

    // A client that trusts another CA refuses the engine's certificate.
    let mut wary = identity(&dir, "wary", &pki, Validity::Days(1));
    wary.ca = dir.join("intruder-ca.pem");
    let (ok, stderr) = volume_info_with(&cluster, e, &TlsFiles::flags(&wary));
    assert!(!ok, "the client accepted a server of another CA");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // Half the flags: a one-line error before anything is dialled.
    let (ok, stderr) = volume_info_with(
        &cluster,
        e,
        &["--tls-cert".into(), good.cert.display().to_string()],
    );
    assert!(!ok);
    assert!(stderr.contains("--tls-key"), "{stderr}");

    // And the cluster's own identity is still served.
    let (ok, stderr) = volume_info_with(&cluster, e, &TlsFiles::flags(&good));
    assert!(ok, "{stderr}");
}

#[test]
fn an_engine_without_a_certificate_cannot_fence_the_serving_one() {
    let (mut cluster, _pki, _files) = tls_cluster(3);
    let a = cluster
        .start_engine(&EngineSpec::new("fence", "16MiB", &[0, 1, 2]))
        .unwrap();
    let epoch = cluster.volume_info(a).unwrap()["epoch"].as_u64().unwrap();

    // Someone who can reach the replica daemons' ports, but holds no
    // certificate, starts an engine for the same volume: opening it would
    // take a higher epoch and fence engine A.
    let tls = std::mem::take(&mut cluster.tls);
    let b = cluster
        .spawn_engine(&EngineSpec::new("fence", "16MiB", &[0, 1, 2]).arg("--open-timeout", "3s"))
        .unwrap();
    cluster.tls = tls;
    let engine_b = &mut cluster.engines[b].process;
    let status = poll(
        Duration::from_secs(60),
        "the intruding engine to give up",
        || Ok(engine_b.exited()),
    )
    .unwrap();
    assert!(!status.success(), "the intruding engine opened the volume");

    // Engine A still owns the volume at its epoch and takes writes.
    let info = cluster.volume_info(a).unwrap();
    assert_eq!(info["epoch"].as_u64().unwrap(), epoch, "{info}");
    assert_eq!(info["replicas_rw"], 3, "{info}");
    let src = cluster.path().join("src");
    let data = random_file(&src, 4 * MIB, 11).unwrap();
    cluster.write_flushed(a, &src).unwrap();
    assert!(cluster.read_back(a, data.len()).unwrap() == data);
    for r in 0..3 {
        let log = cluster.replicas[r].process.log_text();
        assert!(log.contains("not a TLS client"), "replica-{r}: {log}");
    }
}

#[test]
fn certificates_rotate_under_running_processes() {
    let (mut cluster, _old, files) = tls_cluster(3);
    let e = cluster
        .start_engine(&EngineSpec::new("rotate", "16MiB", &[0, 1, 2]))
        .unwrap();

    // The whole cluster moves to a new CA: the files are replaced in place.
    let new = Pki::new("next year's CA").unwrap();
    new.issue("cluster", &["127.0.0.1", "localhost"], Validity::Days(1))
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    new.write_ca(&files.ca).unwrap();

    // Open streams keep their sessions: writes go on.
    let src = cluster.path().join("src");
    let data = random_file(&src, 4 * MIB, 3).unwrap();
    cluster.write_flushed(e, &src).unwrap();
    // New connections use the new files on both ends, with no restart.
    let info = cluster.volume_info(e).unwrap();
    assert_eq!(info["replicas_rw"], 3, "{info}");

    // A replica daemon restarted after the rotation is reconnected by the
    // engine with its reloaded client identity and returns to RW.
    cluster.replicas[1].process.kill9().unwrap();
    cluster.restart_replica(1).unwrap();
    cluster
        .wait_mode(e, 1, "RW", Duration::from_secs(60))
        .unwrap();
    assert!(cluster.read_back(e, data.len()).unwrap() == data);
    cluster.verify(e).expect("the replicas are identical");
}
