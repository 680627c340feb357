//! Mutual TLS through node daemons (issue 14): daemons given `--tls-*`
//! serve only clients of their CA, and the engines they start inherit the
//! files — on their control service and on their channels to the replica
//! daemons. Its own test binary: this process's channels dial with TLS
//! (`corral_client::use_tls` is process-wide).

use std::time::Duration;

use corral_tests::node::NodeCluster;
use corral_tests::{corral_bin, run_bounded};
use corral_tls::pki::{LOOPBACK_NAMES, Pki, Validity};
use corral_tls::{ClientTls, TlsFiles};

const SIZE: u64 = 16 << 20;

#[test]
fn node_daemons_and_the_engines_they_start_run_mutual_tls() {
    let mut nodes = NodeCluster::start(0).unwrap();
    let pki = Pki::new("node test CA").unwrap();
    let files = TlsFiles {
        cert: nodes.path().join("node.pem"),
        key: nodes.path().join("node-key.pem"),
        ca: nodes.path().join("ca.pem"),
    };
    pki.issue("corral-node", LOOPBACK_NAMES, Validity::Days(1))
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    pki.write_ca(&files.ca).unwrap();
    corral_client::use_tls(ClientTls::new(files.clone()).unwrap()).unwrap();
    let flags = files.flags();
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    for _ in 0..3 {
        nodes.start_node(&flag_refs).unwrap();
    }

    // Replicas created and an engine started over the daemons' TLS.
    nodes.create_replicas("vol", SIZE, &[0, 1, 2]).unwrap();
    let status = nodes
        .start_engine(0, nodes.spec("vol", SIZE, &[0, 1, 2]))
        .unwrap();

    // The engine's control service wants the cluster's certificate too...
    let info = |with_flags: bool| {
        let mut cmd = std::process::Command::new(corral_bin());
        cmd.args([
            "volume",
            "--engine",
            &status.control_address,
            "--json",
            "info",
        ]);
        if with_flags {
            cmd.args(&flags);
        }
        run_bounded(&mut cmd, Duration::from_secs(60)).unwrap()
    };
    let plain = info(false);
    assert!(!plain.status.success(), "the engine served a plain client");
    // ...and it opened the volume on all three daemons over TLS.
    let mut last = String::new();
    let all_rw = corral_tests::poll(Duration::from_secs(60), "3 RW replicas", || {
        let out = info(true);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok((v["replicas_rw"] == 3).then_some(()))
    });
    assert!(all_rw.is_ok(), "{last}\n{}", nodes.engine_log(0, "vol"));
}
