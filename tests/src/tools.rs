//! Finding programs and running them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of a third-party program, or a panic that says how to install it.
pub fn require_tool(name: &str, debian_package: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!("this test needs `{name}`, which is not installed: run `apt-get install -y {debian_package}` (.ci/run does)")
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a command and returns its output, panicking (with the command line) if it cannot start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout. Panics with stderr otherwise.
pub fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr. Panics if it succeeded.
pub fn run_err(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        !output.status.success(),
        "{command:?} succeeded but should have failed:\nstdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The workspace's target directory for the running test's profile (`target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/debug/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .to_owned()
}

/// A binary of this workspace, built on demand if this test run did not build it already.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    if !path.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_ok(Command::new(cargo).args(["build", "--bin", name]));
    }
    path
}

/// Makes a new key (`key_spec`: the `-newkey` arguments of `openssl req`, e.g. `["-newkey",
/// "rsa:2048"]`) and a CSR with subject `CN=<common_name>` with openssl, as a device or an
/// operator would, into `key` and `csr`.
pub fn openssl_csr(key_spec: &[&str], common_name: &str, key: &Path, csr: &Path) {
    run_ok(
        Command::new(require_tool("openssl", "openssl"))
            .args(["req", "-new"])
            .args(key_spec)
            .args(["-nodes", "-subj", &format!("/CN={common_name}"), "-keyout"])
            .arg(key)
            .arg("-out")
            .arg(csr),
    );
}
