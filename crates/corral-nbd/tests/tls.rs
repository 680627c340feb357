//! NBD over TLS (`NBD_OPT_STARTTLS` with client certificates): real libnbd
//! clients (`nbdinfo`, `nbdcopy`, `fio --ioengine=nbd`) with a certificates
//! directory, refusals (a plaintext client when TLS is required, a client
//! certificate from another CA), and the option rules on a raw socket.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use corral_nbd::{NbdTls, ServerConfig};
use corral_tls::pki::{Pki, Validity};
use corral_tls::{ClientTls, ServerTls, TlsFiles};

const MIB: u64 = 1 << 20;
const TOOL: Duration = Duration::from_secs(60);

const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const REP_SERVER: u32 = 2;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

/// A CA, the server's identity, and clients' identities: one signed by the
/// CA, one by another CA. Each client also has a libnbd certificates
/// directory (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Certs {
    _dir: tempfile::TempDir,
    server: TlsFiles,
    client: TlsFiles,
    rogue: TlsFiles,
    libnbd: PathBuf,
    libnbd_rogue: PathBuf,
}

fn files(dir: &Path, stem: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// A libnbd certificates directory: the CA that signs the server, and the
/// client's certificate and key.
fn libnbd_dir(dir: &Path, name: &str, ca: &Path, client: &TlsFiles) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::copy(ca, d.join("ca-cert.pem")).expect("copy");
    std::fs::copy(&client.cert, d.join("client-cert.pem")).expect("copy");
    std::fs::copy(&client.key, d.join("client-key.pem")).expect("copy");
    d
}

impl Certs {
    fn new() -> Certs {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Pki::new("corral NBD test CA").expect("CA");
        ca.write_ca(&dir.path().join("ca.pem")).expect("write CA");
        let names = ["127.0.0.1", "localhost"];
        let server = files(dir.path(), "server");
        ca.issue("nbd-server", &names, Validity::Days(1))
            .and_then(|i| i.write(&server.cert, &server.key))
            .expect("server certificate");
        let client = files(dir.path(), "client");
        ca.issue("nbd-client", &[], Validity::Days(1))
            .and_then(|i| i.write(&client.cert, &client.key))
            .expect("client certificate");
        // Another CA's client: it trusts our CA (so it accepts the server),
        // but its own certificate is signed by a CA the server does not know.
        let other = Pki::new("some other CA").expect("CA");
        let rogue = files(dir.path(), "rogue");
        other
            .issue("rogue-client", &[], Validity::Days(1))
            .and_then(|i| i.write(&rogue.cert, &rogue.key))
            .expect("rogue certificate");
        let libnbd = libnbd_dir(dir.path(), "libnbd", &server.ca, &client);
        let libnbd_rogue = libnbd_dir(dir.path(), "libnbd-rogue", &server.ca, &rogue);
        Certs {
            _dir: dir,
            server,
            client,
            rogue,
            libnbd,
            libnbd_rogue,
        }
    }

    fn config(&self, require: bool) -> ServerConfig {
        let server = ServerTls::new(self.server.clone()).expect("server TLS");
        ServerConfig {
            tls: Some(NbdTls::new(server, require)),
            ..ServerConfig::default()
        }
    }
}

/// `nbds://ADDR/EXPORT?tls-certificates=DIR`
fn nbds(srv: &TestServer, export: &str, certs: &Path) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        srv.addr,
        certs.display()
    )
}

async fn start(certs: &Certs, require: bool) -> TestServer {
    TestServer::start_with(&[("vol0", "a volume", 16 * MIB)], certs.config(require)).await
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reads_the_size_over_tls() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let uri = nbds(&srv, "vol0", &certs.libnbd);
    let size = run_ok("nbdinfo", &["--size", &uri], TOOL).await;
    assert_eq!(size.trim(), "16777216");
    let out = run_ok("nbdinfo", &[&uri], TOOL).await;
    assert!(out.contains("export=\"vol0\""), "{out}");
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    // Listing is an option too: over TLS it works.
    let list = format!(
        "nbds://{}?tls-certificates={}",
        srv.addr,
        certs.libnbd.display()
    );
    let out = run_ok("nbdinfo", &["--list", &list], TOOL).await;
    assert!(out.contains("description: a volume"), "{out}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_data_over_tls() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let data = pseudo_random(16 * MIB as usize, 0x7157);
    write_file(&input, &data);
    let uri = nbds(&srv, "vol0", &certs.libnbd);
    run_ok("nbdcopy", &["--flush", input.to_str().unwrap(), &uri], TOOL).await;
    assert!(
        std::fs::read(&srv.paths[0]).unwrap() == data,
        "backing file differs from the input"
    );
    run_ok("nbdcopy", &[&uri, output.to_str().unwrap()], TOOL).await;
    assert!(
        std::fs::read(&output).unwrap() == data,
        "data read back over TLS differs"
    );
    srv.shutdown().await;
}

/// fio's nbd engine takes only a URI, and libnbd refuses `tls-certificates`
/// in a URI unless the program allows it (fio does not), so fio finds the
/// certificates where libnbd looks by default: `$HOME/.pki/libnbd` for a
/// user other than root (root gets `/etc/pki/libnbd`, which a test must not
/// touch). Run as root, the test runs fio as `nobody` (`setpriv`), with a
/// world-readable HOME holding copies of the client's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_writes_over_tls() {
    use std::os::unix::fs::PermissionsExt;
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let home = tempfile::tempdir().unwrap();
    let pki = home.path().join(".pki");
    std::fs::create_dir(&pki).unwrap();
    let dir = pki.join("libnbd");
    std::fs::create_dir(&dir).unwrap();
    for name in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(certs.libnbd.join(name), dir.join(name)).unwrap();
    }
    let root = running_as_root();
    if root {
        // Readable by `nobody`: a throwaway key for a throwaway CA.
        for p in [home.path(), &pki, &dir] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for name in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
    }
    let uri = format!("--uri=nbds://{}/vol0", srv.addr);
    let fio_args = [
        "--name=nbd-tls",
        "--ioengine=nbd",
        &uri,
        "--rw=randwrite",
        "--bs=64k",
        "--size=16m",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--output-format=normal",
    ];
    let mut cmd = if root {
        let mut c = tokio::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"]);
        c
    } else {
        tokio::process::Command::new("fio")
    };
    cmd.args(fio_args)
        .env("HOME", home.path())
        .current_dir(home.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("fio did not finish in time")
        .expect("cannot run fio (or setpriv)");
    let text = output_text(&out);
    assert!(out.status.success(), "fio failed: {text}");
    assert!(text.contains("issued rwts: total=256,256,"), "{text}");
    assert!(!text.contains("verify: bad"), "{text}");
    srv.shutdown().await;
}

/// Whether this process runs as root (from /proc, without libc).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_is_refused_when_tls_is_required() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let out = run_tool("nbdinfo", &["--size", &srv.uri("vol0")], TOOL).await;
    assert!(!out.status.success(), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.to_lowercase().contains("tls"), "{text}");
    // The server goes on serving TLS clients.
    let size = run_ok(
        "nbdinfo",
        &["--size", &nbds(&srv, "vol0", &certs.libnbd)],
        TOOL,
    )
    .await;
    assert_eq!(size.trim(), "16777216");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let out = run_tool(
        "nbdinfo",
        &["--size", &nbds(&srv, "vol0", &certs.libnbd_rogue)],
        TOOL,
    )
    .await;
    assert!(!out.status.success(), "{}", output_text(&out));
    // The same refusal for a raw client presenting that certificate.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_ACK);
    let rogue = ClientTls::new(certs.rogue.clone()).expect("client TLS");
    // With TLS 1.3 the client finishes its side of the handshake first and
    // learns of the refusal at its first read; with 1.2, at once.
    if let Ok(mut c) = c.into_tls(&rogue).await {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut list = IHAVEOPT.to_be_bytes().to_vec();
        list.extend_from_slice(&OPT_LIST.to_be_bytes());
        list.extend_from_slice(&0u32.to_be_bytes());
        // The write may already fail: the server has hung up.
        let _ = t(c.s.write_all(&list)).await;
        let mut b = [0u8; 1];
        let r = t(c.s.read(&mut b)).await;
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    // A client of the right CA still gets in.
    let size = run_ok(
        "nbdinfo",
        &["--size", &nbds(&srv, "vol0", &certs.libnbd)],
        TOOL,
    )
    .await;
    assert_eq!(size.trim(), "16777216");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_allowed_serves_plaintext_and_tls_clients() {
    let certs = Certs::new();
    let srv = start(&certs, false).await;
    let plain = run_ok("nbdinfo", &["--size", &srv.uri("vol0")], TOOL).await;
    assert_eq!(plain.trim(), "16777216");
    let tls = run_ok(
        "nbdinfo",
        &["--size", &nbds(&srv, "vol0", &certs.libnbd)],
        TOOL,
    )
    .await;
    assert_eq!(tls.trim(), "16777216");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbds_client_of_a_server_without_tls_is_refused() {
    let certs = Certs::new();
    let srv = TestServer::start(&[("vol0", "", 16 * MIB)]).await;
    let out = run_tool(
        "nbdinfo",
        &["--size", &nbds(&srv, "vol0", &certs.libnbd)],
        TOOL,
    )
    .await;
    assert!(!out.status.success(), "{}", output_text(&out));
    srv.shutdown().await;
}

/// GO's data: name, no information requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_required_tls_refuses_options_then_upgrades() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    // Before TLS: every option but STARTTLS and ABORT is TLS_REQD.
    for (code, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, go_data("vol0")),
        (OPT_GO, go_data("vol0")),
        (OPT_STRUCTURED_REPLY, vec![]),
        (999, b"junk".to_vec()),
    ] {
        c.option(code, &data).await;
        let (opt, typ, _) = c.option_reply().await;
        assert_eq!((opt, typ), (code, REP_ERR_TLS_REQD), "option {code}");
    }
    // STARTTLS with data is malformed; without, acknowledged.
    c.option(OPT_STARTTLS, b"x").await;
    assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await, (OPT_STARTTLS, REP_ACK, vec![]));
    let client = ClientTls::new(certs.client.clone()).expect("client TLS");
    let mut c = c.into_tls(&client).await.expect("TLS handshake");
    // Over TLS: a second STARTTLS is invalid, the rest works.
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_LIST, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_SERVER);
    assert_eq!(c.option_reply().await.1, REP_ACK);
    let (size, _) = c.go("vol0", true).await;
    assert_eq!(size, 16 * MIB);

    // Transmission over TLS: pipelined writes, large reads.
    let data = pseudo_random(8 * MIB as usize, 42);
    let piece = 256 << 10;
    for (i, chunk) in data.chunks(piece).enumerate() {
        let off = (i * piece) as u64;
        c.request(CMD_WRITE, 0, i as u64, off, chunk.len() as u32, chunk)
            .await;
    }
    for _ in 0..data.len() / piece {
        assert_eq!(c.simple_reply().await.0, 0);
    }
    c.request(CMD_FLUSH, 0, 1000, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 1000));
    for i in 0..4u64 {
        c.request(CMD_READ, 0, 2000 + i, i * 2 * MIB, 2 * MIB as u32, &[])
            .await;
    }
    let mut back = vec![Vec::new(); 4];
    for _ in 0..4 {
        let (flags, _typ, cookie, payload) = c.chunk().await;
        assert_eq!(flags & 1, 1, "one chunk per read");
        let i = (cookie - 2000) as usize;
        back[i] = payload[8..].to_vec();
    }
    assert!(back.concat() == data, "data read back over TLS differs");
    c.request(CMD_DISC, 0, 0, 0, 0, &[]).await;
    let mut rest = Vec::new();
    let _ = t(tokio::io::AsyncReadExt::read_to_end(&mut c.s, &mut rest)).await;
    assert!(rest.is_empty());
    assert!(
        std::fs::read(&srv.paths[0]).unwrap()[..data.len()] == data[..],
        "backing file differs"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_export_name_before_tls_closes_the_connection() {
    let certs = Certs::new();
    let srv = start(&certs, true).await;
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_EXPORT_NAME, b"vol0").await;
    assert!(c.expect_closed().await.is_empty());
    // ABORT is still answered.
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await, (OPT_ABORT, REP_ACK, vec![]));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_starttls_without_tls_is_refused_by_policy() {
    let srv = TestServer::start(&[("vol0", "", 16 * MIB)]).await;
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    c.option(OPT_STARTTLS, &[]).await;
    let (opt, typ, msg) = c.option_reply().await;
    assert_eq!((opt, typ), (OPT_STARTTLS, REP_ERR_POLICY));
    assert!(String::from_utf8_lossy(&msg).contains("TLS"));
    // Negotiation goes on in plaintext.
    let (size, _) = c.go("vol0", false).await;
    assert_eq!(size, 16 * MIB);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_plaintext_after_starttls_is_not_taken() {
    let certs = Certs::new();
    let srv = start(&certs, false).await;
    let mut c = RawClient::connect(srv.addr).await;
    c.flags(3).await;
    // STARTTLS and, without waiting for the ACK, a plaintext GO in the same
    // segment: the server must not act on it.
    let mut m = Vec::new();
    for (code, data) in [(OPT_STARTTLS, vec![]), (OPT_GO, go_data("vol0"))] {
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
    }
    c.send(&m).await;
    let seen = c.expect_closed().await;
    // Nothing, or (if the GO arrived late) the ACK and a TLS alert; never
    // a GO reply.
    assert!(
        seen.is_empty() || seen.len() < 20 + 64,
        "unexpected reply {seen:?}"
    );
    srv.shutdown().await;
}
