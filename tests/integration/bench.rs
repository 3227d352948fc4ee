//! The benchmark in smoke mode: CI checks that it runs end to end and that
//! its counts add up (figures are printed, never asserted: see issue 6),
//! the far-upstream mode included (its CHUNKING sink is a private Postfix
//! instance, so this runs as root with Postfix installed, as CI does).

use std::process::Command;

#[test]
fn bench_smoke_runs_and_counts_correctly() {
    let out = Command::new(env!("CARGO_BIN_EXE_relayq-bench"))
        .args(["--smoke", "--scale", "100", "--compare-done-sync"])
        .output()
        .expect("run relayq-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("relayq: 250 messages accepted and relayed, count matches"),
        "{stdout}"
    );
    assert!(stdout.contains("drained 100 in"), "{stdout}");
    // The far-upstream mode ran against each sink, CHUNKING (Postfix's
    // smtpd) included, and printed its tables.
    for row in [
        "| bench sink (PIPELINING) | 5 ms | ",
        "| bench sink, 421 to a 4th connection | 5 ms | ",
        "| Postfix smtpd (CHUNKING, PIPELINING) | 5 ms | ",
        "| Postfix smtpd, CHUNKING withheld | ",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in {stdout}");
    }
    // The relayq that syncs each done mark on its own ran too, and counted.
    assert_eq!(
        stdout
            .matches("relayq: 250 messages accepted and relayed, count matches")
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("| relayq, done marks synced one by one |"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("bench: ok"), "{stdout}");
}

/// The attack loads of issue 16 in smoke mode: they run and print their
/// figures (RSS, the normal client's latency); nothing is asserted on the
/// figures themselves.
#[test]
fn attack_benchmarks_run_in_smoke_mode() {
    for (part, lines) in [
        (
            "auth-flood",
            &[
                "attackers: ",
                "normal client on 127.0.0.1: ",
                "relayq RSS: ",
                "load during",
            ][..],
        ),
        (
            "idle-flood",
            &[
                "opened 100 idle connections",
                "per idle session",
                "normal client on 127.0.0.1: ",
            ],
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_relayq-bench"))
            .args(["--only", part, "--smoke"])
            .output()
            .expect("run relayq-bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{part} failed:\n{stdout}\n{stderr}");
        for line in lines {
            assert!(stdout.contains(line), "{part}: no {line:?} in:\n{stdout}");
        }
        assert!(stdout.trim_end().ends_with("bench: ok"), "{stdout}");
    }
}
