//! iSCSI conformance: libiscsi's `iscsi-test-cu --dataloss` (the whole
//! default selection) against `corral serve-file --iscsi` over a 1 GiB
//! file. Fails on any CUnit failure or an unfinished (hung) run, and
//! checks that we pass more tests for real than tgt does on this machine
//! (442, skips not counted). Bounded in time.

mod iscsi_common;

use std::process::Command;
use std::time::Duration;

use corral_tests::run_bounded;
use corral_tests::tools::require;
use iscsi_common::{ServeFile, parse_cunit};

/// tgt's real passes over the same 1 GiB file, measured on this machine.
const TGT_PASSES: usize = 442;

#[test]
fn iscsi_test_cu_dataloss_passes_with_no_failures() {
    let tool = require("iscsi-test-cu").unwrap();
    let mut server = ServeFile::start("conformance", "1GiB", &[]).unwrap();
    let out = run_bounded(
        Command::new(tool).args(["--dataloss", &server.url()]),
        Duration::from_secs(20 * 60),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let log = server.dir.path().join("iscsi-test-cu.log");
    std::fs::write(&log, &text).unwrap();
    let s = parse_cunit(&text);
    eprintln!(
        "iscsi-test-cu: {} tests, {} passed, {} skipped, {} failed (log: {})",
        s.tests,
        s.passed,
        s.skipped,
        s.failed,
        log.display()
    );
    assert!(
        s.complete,
        "iscsi-test-cu did not finish its run:\n{}",
        &text[text.len().saturating_sub(4000)..]
    );
    assert!(s.tests > 500, "too few tests ran: {s:?}");
    assert_eq!(s.failed, 0, "failures: {:?}\n{}", s.failures, text);
    assert!(
        s.passed > TGT_PASSES,
        "only {} real passes (tgt: {TGT_PASSES})",
        s.passed
    );
    assert!(server.exited().is_none(), "serve-file died during the run");
    let status = server.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "serve-file exited with {status}");
}

#[test]
fn cunit_parser_counts_skips_and_failures() {
    let text = "Suite: A\n  Test: One ...passed\n  Test: Two ...    [SKIPPED] nope\npassed\n  Test: Three ...    [FAILED] bad\nFAILED\n    1. x.c:1  - CU_FAIL\nSuite: B\n  Test: Four ...passed\n\nRun Summary:    Type  Total\n";
    let s = parse_cunit(text);
    assert_eq!((s.tests, s.passed, s.skipped, s.failed), (4, 2, 1, 1));
    assert_eq!(s.failures, vec!["A.Three".to_string()]);
    assert!(s.complete);
}
