//! The container image, end to end: `docker/smoke-test` builds docker/Containerfile (with the
//! suite's pitr binary, so that no release build runs here), streams a primary into a repository
//! from the pitr container, backs up, restores a moment exactly with the container's own
//! `pitr restore --start`, and checks /healthz, /metrics and the image's HEALTHCHECK from the host.
//!
//! It needs podman (Debian's package); where podman is not installed, or the script exits 77 (podman
//! does not work, or no base image can be had or made), the test says so on stderr and passes
//! without running anything. Every other failure is a failure.

use std::process::{Command, Stdio};

#[test]
fn the_image_streams_backs_up_and_restores_a_moment_exactly() {
    let podman = Command::new("podman").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !podman.map(|s| s.success()).unwrap_or(false) {
        eprintln!("SKIPPED: docker/smoke-test needs podman, which is not installed here (apt-get install podman)");
        return;
    }
    let script = pitr_tests::workspace_root().join("docker/smoke-test");
    let out = Command::new(&script)
        .env("PITR_SMOKE_BINARY", pitr_tests::pitr_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 77: this machine cannot run it at all (podman does not work, or no base image and nothing to
    // make one from); the script says why.
    if out.status.code() == Some(77) {
        eprintln!("{}", stderr.lines().last().unwrap_or("SKIPPED: docker/smoke-test cannot run here"));
        return;
    }
    assert!(out.status.success(), "{} failed ({}):\n{stderr}", script.display(), out.status);
    assert!(stderr.contains("smoke-test: PASS"), "no PASS line from {}:\n{stderr}", script.display());
}
