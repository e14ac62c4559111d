//! Helpers shared by the HTTP integration tests: a minimal HTTP/1.1 client, a
//! server started on a random loopback port, and tiny model specs.
#![allow(dead_code)]

pub mod steps;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_registry::ResolvedModel;
use kiln_server::{ModelSettings, ModelSpec, ServeConfig, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A deliberately small HTTP/1.1 client (Connection: close), enough for these tests.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = decoded;
    }
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post_json(addr: std::net::SocketAddr, path: &str, body: &Value) -> Reply {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

pub struct Running {
    pub addr: std::net::SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

pub async fn start(models: Vec<ModelSpec>, body_limit: usize) -> Running {
    start_with(&test_config(body_limit), models).await
}

/// Start a server with this configuration and wait until it is ready.
pub async fn start_with(config: &ServeConfig, models: Vec<ModelSpec>) -> Running {
    let server = Server::bind(config, models).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let running = Running {
        addr,
        stop: Some(stop),
        task,
    };
    wait_ready(addr).await;
    running
}

pub async fn wait_ready(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if http(addr, "GET", "/v2/health/ready", &[], b"").await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server never became ready");
}

pub fn test_config(body_limit: usize) -> ServeConfig {
    let mut config = ServeConfig::default();
    config.server.port = 0;
    config.server.body_limit = body_limit as u64;
    config
}

pub fn tiny_flux_spec() -> ModelSpec {
    flux_spec("tiny-dev", "test.images.flux")
}

/// A tiny random FLUX fixture folder served under `name`.
pub fn flux_spec(folder: &str, name: &str) -> ModelSpec {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/flux")
        .join(folder);
    let manifest = kiln_pipelines::text_to_image::flux::manifest_for_folder(&dir).unwrap();
    let model = ResolvedModel {
        name: None,
        version: Some(1),
        dir,
        manifest,
    };
    ModelSpec {
        name: name.into(),
        version: Some(1),
        reference: format!("fixtures/flux/{folder}"),
        settings: ModelSettings::default(),
        loader: Arc::new(move || {
            kiln_pipelines::text_to_image::flux::load(&model).map_err(|e| e.to_string())
        }),
    }
}
