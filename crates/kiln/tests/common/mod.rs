//! Running the `kiln` binary from the CLI test binaries: commands, a fitted
//! GLM registered, and `kiln serve` on a free port with a raw HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

pub fn claims_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/claims.csv")
}

pub fn fit_and_register(home: &Path, name: &str, alias: &str) -> String {
    ok(
        home,
        &[
            "glm",
            "fit",
            "--data",
            claims_csv().to_str().unwrap(),
            "--formula",
            "claims ~ driver_age + C(region) + urban",
            "--family",
            "poisson",
            "--exposure",
            "exposure",
            "--register",
            name,
            "--alias",
            alias,
        ],
    )
}

pub struct ServerProcess(pub Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn get(port: u16, request: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    Some(reply)
}

pub fn serve(home: &Path, args: &[&str]) -> (ServerProcess, u16) {
    let port = free_port();
    let mut all = vec!["serve".to_string(), "--port".into(), port.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&all)
        .env("KILN_HOME", home)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let process = ServerProcess(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ready = get(
            port,
            "GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if ready.is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return (process, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("kiln serve did not become ready");
}

pub fn invoke(port: u16, body: &str) -> String {
    get(
        port,
        &format!(
            "POST /invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap()
}

pub fn get_path(port: u16, path: &str) -> String {
    get(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .unwrap()
}
