//! Running the `kiln` binary from the CLI test binaries.

use std::path::Path;
use std::process::{Command, Output};

pub fn kiln(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_LOG", "warn")
        .output()
        .expect("kiln runs")
}

pub fn ok(home: &Path, args: &[&str]) -> String {
    let out = kiln(home, args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fails(home: &Path, args: &[&str]) -> String {
    let out = kiln(home, args);
    assert!(!out.status.success(), "kiln {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
