//! Helpers the pipeline tests share: calling a pipeline with JSON fields,
//! decoding response PNGs, and a loopback HTTP server standing in for LoRA
//! hosts: plain files
//! (with Range support), redirects (same host, and to `localhost`, which tests
//! do not trust), an oversized file, a pickle, a 404, CivitAI's model API and
//! download redirect, and the Hugging Face Hub's resolve and repo-info
//! endpoints as hf-hub calls them. It counts hits per path and query and
//! records Authorization headers.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use kiln_fetch::{Hub, Policy};
use kiln_pipelines::lora::sources::LoraSettings;

/// The commit the fake Hub reports.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct LoraServer {
    pub port: u16,
    pub style: Vec<u8>,
    hits: Mutex<HashMap<String, usize>>,
    auth: Mutex<Vec<(String, String)>>,
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

impl LoraServer {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Requests seen for `path_and_query`.
    pub fn hits(&self, path_and_query: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    /// Authorization headers seen, by path.
    pub fn auth_for(&self, path: &str) -> Vec<String> {
        self.auth
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Settings trusting only this server's 127.0.0.1 (not `localhost`),
    /// caching under `cache`.
    pub fn settings(&self, cache: &Path) -> LoraSettings {
        LoraSettings {
            dirs: Vec::new(),
            policy: Policy {
                allowed_hosts: vec!["127.0.0.1".into()],
                private_hosts: vec!["127.0.0.1".into()],
                ..Policy::default()
            },
            cache_dir: cache.join("loras"),
            disk_budget: 1 << 30,
            hub: Hub {
                endpoint: self.base(),
                token: None,
                cache: cache.join("hf"),
                progress: false,
            },
            civitai: self.base(),
        }
    }
}

fn file_response(bytes: &[u8], headers: &HeaderMap) -> Response {
    file_response_tagged(bytes, headers, "style-etag")
}

/// A file with its own ETag (hf-hub stores blobs by ETag).
fn file_response_tagged(bytes: &[u8], headers: &HeaderMap, etag: &str) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    let builder = Response::builder()
        .header("etag", format!("\"{etag}\""))
        .header("x-repo-commit", COMMIT);
    match range {
        Some((start, end)) if start < bytes.len() => {
            let end = end.min(bytes.len() - 1);
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{end}/{}", bytes.len()),
                )
                .body(Body::from(bytes[start..=end].to_vec()))
                .unwrap()
        }
        _ => builder.body(Body::from(bytes.to_vec())).unwrap(),
    }
}

fn redirect(to: String) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .body(Body::empty())
        .unwrap()
}

async fn handle(server: Arc<LoraServer>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    let key = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    *server.hits.lock().unwrap().entry(key).or_default() += 1;
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        server
            .auth
            .lock()
            .unwrap()
            .push((path.clone(), auth.to_string()));
    }
    let json = |value: serde_json::Value| {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(value.to_string()))
            .unwrap()
    };
    match path.as_str() {
        "/files/style.safetensors" => {
            // Slow enough that concurrent requests overlap.
            tokio::time::sleep(Duration::from_millis(150)).await;
            file_response(&server.style, &headers)
        }
        "/redirect/ok" => redirect("/files/style.safetensors".into()),
        "/redirect/loopback" => redirect(format!(
            "http://localhost:{}/files/style.safetensors",
            server.port
        )),
        "/redirect/loop" => redirect("/redirect/loop".into()),
        "/big.safetensors" => Response::new(Body::from(vec![0u8; 4096])),
        "/files/input.png" => {
            let mut png = Vec::new();
            image::RgbImage::from_pixel(24, 16, image::Rgb([200, 40, 10]))
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            Response::new(Body::from(png))
        }
        "/files/broken" => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::empty())
            .unwrap(),
        "/pickle.safetensors" => {
            let mut bytes = vec![0x80, 0x02, b'}', b'q', 0x00];
            bytes.resize(64, b'.');
            Response::new(Body::from(bytes))
        }
        "/api/v1/models/77" => json(serde_json::json!({
            "id": 77, "modelVersions": [{"id": 456}, {"id": 455}]
        })),
        "/api/download/models/456" => redirect("/files/style.safetensors".into()),
        "/owner/repo/resolve/main/style.safetensors" => file_response(&server.style, &headers),
        "/api/models/owner/repo/revision/main" => json(serde_json::json!({
            "sha": COMMIT,
            "siblings": [{"rfilename": "README.md"}, {"rfilename": "style.safetensors"}]
        })),
        _ if path.starts_with("/api/models/owner/") => match hub_repo(&path) {
            Some((folder, hidden, extras)) => json(serde_json::json!({
                "sha": COMMIT,
                "siblings": listing_with(&folder, hidden, extras)
                    .iter()
                    .map(|f| serde_json::json!({"rfilename": f}))
                    .collect::<Vec<_>>()
            })),
            None => not_found(),
        },
        _ if path.starts_with("/owner/") && path.contains("/resolve/main/") => {
            let (repo, file) = path.split_once("/resolve/main/").unwrap_or_default();
            let served = hub_repo(&format!("/api/models{repo}/revision/main"))
                .filter(|_| !file.split('/').any(|part| part == ".." || part.is_empty()))
                .and_then(|(folder, _, _)| std::fs::read(folder.join(file)).ok());
            match served {
                Some(bytes) => file_response_tagged(
                    &bytes,
                    &headers,
                    &format!("{repo}/{file}").replace('/', "-"),
                ),
                None => not_found(),
            }
        }
        _ => not_found(),
    }
}

/// Listings the fake Hub adds to a pipeline repo beyond its folder's files:
/// a root single file, a pickle and a precision variant (none of which exist).
const PIPELINE_EXTRAS: [&str; 3] = [
    "flux1-dev.safetensors",
    "transformer/diffusion_pytorch_model.bin",
    "transformer/diffusion_pytorch_model.fp16.safetensors",
];

/// Listings the fake Hub adds to an LLM repo: the pickled copy of the weights.
const LLM_EXTRAS: [&str; 1] = ["pytorch_model.bin"];

/// Repos on the fake Hub, by their repo-info path: `owner/tiny-flux` (the tiny
/// FLUX.1-dev fixture plus `PIPELINE_EXTRAS`), `owner/pickled` (the same, with
/// the transformer's safetensors left out of the listing) and `owner/tiny-qwen3`
/// (the transformers LLM fixture plus `LLM_EXTRAS`).
fn hub_repo(info_path: &str) -> Option<(PathBuf, &'static str, &'static [&'static str])> {
    match info_path {
        "/api/models/owner/tiny-flux/revision/main" => {
            Some((fixtures().join("tiny-dev"), "", &PIPELINE_EXTRAS))
        }
        "/api/models/owner/pickled/revision/main" => Some((
            fixtures().join("tiny-dev"),
            "transformer/diffusion_pytorch_model.safetensors",
            &PIPELINE_EXTRAS,
        )),
        "/api/models/owner/tiny-qwen3/revision/main" => {
            Some((fixtures().join("../llm/tiny-qwen3"), "", &LLM_EXTRAS))
        }
        _ => None,
    }
}

/// The files a pipeline repo lists (`hidden` left out), `reference/` excluded.
pub fn repo_listing(folder: &Path, hidden: &str) -> Vec<String> {
    listing_with(folder, hidden, &PIPELINE_EXTRAS)
}

/// A repo's listing: its folder's files (`hidden` and `reference/` left out)
/// plus `extras` that the Hub lists but does not serve.
fn listing_with(folder: &Path, hidden: &str, extras: &[&str]) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push(relative);
            }
        }
    }
    let mut files = Vec::new();
    walk(folder, folder, &mut files);
    files.retain(|f| !f.starts_with("reference/") && f != hidden);
    files.extend(extras.iter().map(|f| f.to_string()));
    files.sort();
    files
}

fn not_found() -> Response {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from("no such file"))
        .unwrap()
}

/// The process-wide server (started on first use).
pub fn server() -> &'static Arc<LoraServer> {
    static SERVER: OnceLock<Arc<LoraServer>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let server = Arc::new(LoraServer {
            port: listener.local_addr().unwrap().port(),
            style: std::fs::read(fixtures().join("lora/style_peft.safetensors")).unwrap(),
            hits: Mutex::new(HashMap::new()),
            auth: Mutex::new(Vec::new()),
        });
        let shared = Arc::clone(&server);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
                    handle(Arc::clone(&shared), uri, headers)
                });
                axum::serve(listener, app).await.unwrap();
            });
        });
        server
    })
}

/// Run `pipeline` on JSON fields; the error as text.
pub fn predict(
    pipeline: &dyn kiln_pipelines::Pipeline,
    input: serde_json::Value,
) -> Result<serde_json::Value, String> {
    use kiln_pipelines::{PredictInput, PredictRequest, Prediction};
    let serde_json::Value::Object(fields) = input else {
        panic!("predict takes a JSON object")
    };
    match pipeline.predict(PredictRequest {
        input: PredictInput::Fields(fields),
        params: serde_json::Map::new(),
    }) {
        Ok(Prediction::Json(value)) => Ok(value),
        Ok(Prediction::Tensors(_)) => panic!("image pipelines return JSON"),
        Err(e) => Err(e.to_string()),
    }
}

/// A base64 PNG's pixels as floats in [0, 1].
/// Largest difference between a response's first image (8-bit PNG) and a
/// reference image as floats in [0, 1].
pub fn worst_pixel(output: &serde_json::Value, reference: &candle_core::Tensor) -> f32 {
    let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
    png_pixels(output["images"][0]["base64"].as_str().unwrap())
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

pub fn png_pixels(b64: &str) -> Vec<f32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes)
        .unwrap()
        .to_rgb8()
        .as_raw()
        .iter()
        .map(|v| f32::from(*v) / 255.0)
        .collect()
}
