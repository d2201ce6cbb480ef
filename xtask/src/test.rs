//! `cargo xtask test`: every test of the workspace, then one summary line.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

/// Totals parsed from libtest's `test result:` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a line like `test result: ok. 22 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Tests marked `#[ignore]` in the workspace (the micro-benchmarks, run by `cargo xtask
/// bench`). A different count means a test was ignored or un-ignored without updating this.
const EXPECTED_IGNORED: u64 = 1;

/// Tests that record a skip in `$DATAPATH_SKIP_LOG` when this machine cannot run them
/// (libtest would count them as passed). None is expected on the machine kind the project
/// targets (BTF, root, kernel 6.18): any skip fails the run.
const EXPECTED_SKIPS: usize = 0;

pub fn run(extra: &[String]) -> Result<()> {
    if !datapath_tests::is_root() {
        bail!("cargo xtask test loads BPF programs and builds network namespaces: run it as root");
    }
    crate::setup::ensure()?;
    crate::build(false)?;
    eprintln!("==> running the tests (unit, property, BPF_PROG_TEST_RUN, namespace lab)");
    let skip_log = crate::workspace().join("target/test-skips.log");
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "datapath-ebpf",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ])
    .args(extra)
    .env(
        "DATAPATH_USER_BIN",
        crate::workspace().join("target/debug/datapath-user"),
    )
    .env("DATAPATH_SKIP_LOG", &skip_log)
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait()?;
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    println!();
    for skip in &skips {
        println!("SKIPPED: {skip}");
    }
    // A skipped test returned early: libtest counted it as passed.
    println!(
        "{} passed, {} failed, {} skipped ({} ignored, {} skipped at run time)",
        totals.passed - skips.len() as u64,
        totals.failed,
        totals.ignored + skips.len() as u64,
        totals.ignored,
        skips.len()
    );
    if !status.success() || totals.failed > 0 {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    check_skips(totals.ignored, skips.len(), extra)
}

/// Fails on a surprise: more or fewer ignored tests than the workspace marks, or a test that
/// skipped itself. A filter (`extra` arguments) runs a subset, so only skips are checked then.
fn check_skips(ignored: u64, skipped: usize, extra: &[String]) -> Result<()> {
    if skipped != EXPECTED_SKIPS {
        bail!("{skipped} tests skipped at run time, expected {EXPECTED_SKIPS} (see the SKIPPED lines)");
    }
    if extra.is_empty() && ignored != EXPECTED_IGNORED {
        bail!("{ignored} tests ignored, expected {EXPECTED_IGNORED}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surprises_in_skips_fail() {
        assert!(check_skips(EXPECTED_IGNORED, EXPECTED_SKIPS, &[]).is_ok());
        assert!(check_skips(EXPECTED_IGNORED, EXPECTED_SKIPS + 1, &[]).is_err());
        assert!(check_skips(EXPECTED_IGNORED + 1, EXPECTED_SKIPS, &[]).is_err());
        // A filtered run ignores fewer tests, but a skip is still a surprise.
        assert!(check_skips(0, EXPECTED_SKIPS, &["x".into()]).is_ok());
        assert!(check_skips(0, EXPECTED_SKIPS + 1, &["x".into()]).is_err());
    }

    #[test]
    fn result_lines_are_summed() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 22 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.03s");
        t.add_line(
            "test result: FAILED. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 30,
                failed: 1,
                ignored: 1
            }
        );
    }
}
