//! The `kiln` binary as a user drives it: fit, register, manage, predict and serve.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{claims_csv, fails, fit_and_register, get, invoke, ok, serve};

#[test]
fn glm_fit_prints_a_statsmodels_style_summary() {
    let home = tempfile::tempdir().unwrap();
    let summary = fit_and_register(home.path(), "main.pricing.claims", "champion");
    for needle in [
        "Generalized Linear Model Regression Results",
        "Model Family:",
        "Poisson",
        "C(region)[T.coastal]",
        "P>|z|",
        "No. Iterations:",
    ] {
        assert!(
            summary.contains(needle),
            "{needle:?} missing from:\n{summary}"
        );
    }
}

#[test]
fn registry_commands_manage_versions_aliases_and_tags() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    fit_and_register(home, "main.pricing.claims", "champion");
    fit_and_register(home, "main.pricing.claims", "challenger");
    let list = ok(home, &["models", "list"]);
    assert!(
        list.contains("main.pricing.claims") && list.contains("@challenger=2 @champion=1"),
        "{list}"
    );
    ok(
        home,
        &[
            "models",
            "alias",
            "set",
            "main.pricing.claims",
            "champion",
            "2",
        ],
    );
    ok(
        home,
        &[
            "models",
            "tag",
            "set",
            "main.pricing.claims",
            "owner=pricing",
        ],
    );
    ok(
        home,
        &[
            "models",
            "tag",
            "set",
            "main.pricing.claims",
            "validated=yes",
            "--version",
            "2",
        ],
    );
    let show: serde_json::Value = serde_json::from_str(&ok(
        home,
        &["models", "show", "main.pricing.claims", "--json"],
    ))
    .unwrap();
    assert_eq!(show["aliases"]["champion"], 2);
    assert_eq!(show["tags"]["owner"], "pricing");
    assert_eq!(show["versions"][1]["tags"]["validated"], "yes");
    assert_eq!(show["versions"][1]["pipeline"], "tabular/glm");

    // A version folder can be registered elsewhere with --from.
    let version_dir = home.join("registry/models/main/pricing/claims/versions/2");
    let out = ok(
        home,
        &[
            "models",
            "register",
            "main.staging.claims",
            "--from",
            version_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("registered models:/main.staging.claims/1"),
        "{out}"
    );

    ok(
        home,
        &[
            "models",
            "alias",
            "delete",
            "main.pricing.claims",
            "challenger",
        ],
    );
    ok(
        home,
        &["models", "delete", "main.pricing.claims", "--version", "1"],
    );
    let show = ok(home, &["models", "show", "main.pricing.claims"]);
    assert!(
        !show.contains("version 1 ") && show.contains("version 2"),
        "{show}"
    );
    ok(home, &["models", "delete", "main.pricing.claims"]);
    assert!(
        fails(home, &["models", "show", "main.pricing.claims"])
            .contains("model main.pricing.claims is not registered")
    );
}

#[test]
fn bad_names_and_references_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let err = fails(home, &["models", "show", "pricing.claims"]);
    assert!(err.contains("expected three dot-separated parts"), "{err}");
    let err = fails(home, &["serve", "--port", "0", "models:/a.b.c@champion"]);
    assert!(
        err.contains("cannot serve models:/a.b.c@champion") && err.contains("not registered"),
        "{err}"
    );
    let err = fails(home, &["models", "alias", "set", "a.b.c", "7up7", "1"]);
    assert!(err.contains("not registered"), "{err}");
    let err = fails(
        home,
        &[
            "glm",
            "fit",
            "--data",
            claims_csv().to_str().unwrap(),
            "--formula",
            "claims ~ nope",
            "--family",
            "poisson",
        ],
    );
    assert!(err.contains("column `nope`: no such column"), "{err}");
}

#[test]
fn predict_runs_a_registered_model_on_a_csv() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    fit_and_register(home, "main.pricing.claims", "champion");
    let rows = home.join("rows.csv");
    std::fs::write(
        &rows,
        "driver_age,region,urban,exposure\n30,north,1,1.0\n30,north,1,0.5\n",
    )
    .unwrap();
    let out: serde_json::Value = serde_json::from_str(&ok(
        home,
        &[
            "predict",
            "models:/main.pricing.claims@champion",
            "--data",
            rows.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let predictions = out["predictions"].as_array().unwrap();
    let (full, half) = (
        predictions[0].as_f64().unwrap(),
        predictions[1].as_f64().unwrap(),
    );
    assert!(
        (full / half - 2.0).abs() < 1e-12,
        "exposure is a multiplier under the log link"
    );
}

#[test]
fn serve_with_no_arguments_serves_the_built_in_model_and_stops_on_sigterm() {
    let home = tempfile::tempdir().unwrap();
    let (mut server, port) = serve(home.path(), &[]);
    let reply = invoke(
        port,
        r#"{"dataframe_records": [{"driver_age": 30, "vehicle_power": 6, "region": "north", "urban": 1, "exposure": 1.0}]}"#,
    );
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("\"predictions\":[0."),
        "{reply}"
    );
    // The default model was fitted once and registered under its alias.
    let list = ok(home.path(), &["models", "list"]);
    assert!(
        list.contains("kiln.examples.claims_frequency") && list.contains("@champion=1"),
        "{list}"
    );

    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "kiln exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "kiln did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_registered_models_by_alias_and_pick_with_a_header() {
    let home = tempfile::tempdir().unwrap();
    fit_and_register(home.path(), "main.pricing.claims", "champion");
    let (_server, port) = serve(home.path(), &["models:/main.pricing.claims@champion"]);
    let body = r#"{"dataframe_split": {"columns": ["driver_age", "region", "urban", "exposure"], "data": [[30, "north", 1, 1.0]]}}"#;
    let reply = invoke(port, body);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let meta = get(
        port,
        "GET /v2/models/main.pricing.claims HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(meta.contains("\"versions\":[\"1\"]"), "{meta}");
}

#[test]
fn a_registered_flux_folder_generates_a_png() {
    let home = tempfile::tempdir().unwrap();
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/tiny-dev");
    let out = ok(
        home.path(),
        &[
            "models",
            "register",
            "test.images.flux",
            "--from",
            folder.to_str().unwrap(),
            "--alias",
            "champion",
        ],
    );
    assert!(
        out.contains("registered models:/test.images.flux/1"),
        "{out}"
    );
    let show = ok(home.path(), &["models", "show", "test.images.flux"]);
    assert!(show.contains("text_to_image/flux"), "{show}");
    let png = home.path().join("cat.png");
    let result: serde_json::Value = serde_json::from_str(&ok(
        home.path(),
        &[
            "predict",
            "models:/test.images.flux@champion",
            "-i",
            "prompt=a photo of a cat",
            "-i",
            "width=64",
            "-i",
            "height=48",
            "-i",
            "num_inference_steps=2",
            "-i",
            "seed=42",
            "-o",
            png.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(result["seed"], 42);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(result["images"][0]["width"], 64);
    assert_eq!(result["images"][0]["height"], 48);
    let err = fails(
        home.path(),
        &[
            "predict",
            "test.images.flux",
            "-i",
            "prompt=x",
            "-i",
            "width=1000",
        ],
    );
    assert!(
        err.contains("width: must be a multiple of 16, got 1000; nearest valid: 992 or 1008"),
        "{err}"
    );
}

#[test]
fn a_registered_sdxl_folder_generates_a_png() {
    let home = tempfile::tempdir().unwrap();
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl/tiny-sdxl");
    let out = ok(
        home.path(),
        &[
            "models",
            "register",
            "test.images.sdxl",
            "--from",
            folder.to_str().unwrap(),
            "--alias",
            "champion",
        ],
    );
    assert!(
        out.contains("registered models:/test.images.sdxl/1"),
        "{out}"
    );
    let show = ok(home.path(), &["models", "show", "test.images.sdxl"]);
    assert!(show.contains("text_to_image/sdxl"), "{show}");
    let png = home.path().join("cat.png");
    let result: serde_json::Value = serde_json::from_str(&ok(
        home.path(),
        &[
            "predict",
            "models:/test.images.sdxl@champion",
            "-i",
            "prompt=a photo of a cat",
            "-i",
            "negative_prompt=blurry",
            "-i",
            "num_inference_steps=3",
            "-i",
            "scheduler=KarrasDPM",
            "-i",
            "seed=42",
            "-o",
            png.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(result["seed"], 42);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // The default size comes from the UNet's sample size (8 latents → 64 pixels).
    assert_eq!(result["images"][0]["width"], 64);
    let err = fails(
        home.path(),
        &[
            "predict",
            "test.images.sdxl",
            "-i",
            "prompt=x",
            "-i",
            "scheduler=LMS",
        ],
    );
    assert!(
        err.contains("scheduler") && err.contains("K_EULER_ANCESTRAL"),
        "{err}"
    );
}

#[test]
fn a_registered_single_file_sdxl_checkpoint_generates_a_png() {
    let home = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sdxl");
    // As users lay it out: the checkpoint, SDXL's tokenizers, and (tiny model) its configs.
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures.join("tiny-sdxl-single.safetensors"),
        folder.path().join("illustrious-tiny.safetensors"),
    )
    .unwrap();
    for part in [
        "tokenizer",
        "tokenizer_2",
        "unet",
        "text_encoder",
        "text_encoder_2",
        "vae",
        "scheduler",
    ] {
        std::fs::create_dir_all(folder.path().join(part)).unwrap();
        for entry in std::fs::read_dir(fixtures.join("tiny-sdxl").join(part)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                std::fs::copy(
                    &path,
                    folder.path().join(part).join(path.file_name().unwrap()),
                )
                .unwrap();
            }
        }
    }
    let out = ok(
        home.path(),
        &[
            "models",
            "register",
            "test.images.illustrious",
            "--from",
            folder.path().to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("registered models:/test.images.illustrious/1"),
        "{out}"
    );
    let png = home.path().join("out.png");
    let result: serde_json::Value = serde_json::from_str(&ok(
        home.path(),
        &[
            "predict",
            "test.images.illustrious",
            "-i",
            "prompt=a cat",
            "-i",
            "num_inference_steps=2",
            "-i",
            "guidance_scale=6.0",
            "-o",
            png.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(result["images"][0]["height"], 64);
}

/// A fake Hugging Face Hub on loopback serving `repo` from `folder` (repo info
/// and `resolve/main` files with Range support, one thread per connection).
fn fake_hub(repo: &'static str, folder: PathBuf) -> u16 {
    const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";
    fn files(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().into());
            }
        }
    }
    fn respond(mut stream: TcpStream, repo: &str, folder: &Path) {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let request = String::from_utf8_lossy(&request).to_string();
        let mut words = request.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let range = request.lines().find_map(|l| {
            let line = l.to_ascii_lowercase();
            let (start, end) = line.strip_prefix("range: bytes=")?.split_once('-')?;
            Some((
                start.parse::<usize>().ok()?,
                end.trim().parse::<usize>().ok()?,
            ))
        });
        let (status, headers, body) = if path == format!("/api/models/{repo}/revision/main") {
            let mut listing = Vec::new();
            files(folder, folder, &mut listing);
            let siblings: Vec<_> = listing
                .iter()
                .map(|f| serde_json::json!({"rfilename": f}))
                .collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            (
                "200 OK",
                String::from("content-type: application/json\r\n"),
                body.into_bytes(),
            )
        } else if let Some(file) = path
            .strip_prefix(&format!("/{repo}/resolve/main/"))
            .filter(|f| !f.contains(".."))
            .and_then(|f| {
                std::fs::read(folder.join(f))
                    .ok()
                    .map(|b| (f.replace('/', "-"), b))
            })
        {
            let (etag, bytes) = file;
            let tags = format!("etag: \"{etag}\"\r\nx-repo-commit: {COMMIT}\r\n");
            match range {
                Some((start, end)) if start < bytes.len() => {
                    let end = end.min(bytes.len() - 1);
                    let tags = format!(
                        "{tags}content-range: bytes {start}-{end}/{}\r\n",
                        bytes.len()
                    );
                    ("206 Partial Content", tags, bytes[start..=end].to_vec())
                }
                _ => ("200 OK", tags, bytes),
            }
        } else {
            ("404 Not Found", String::new(), b"no such file".to_vec())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(&body);
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let folder = folder.clone();
            std::thread::spawn(move || respond(stream, repo, &folder));
        }
    });
    port
}

#[test]
fn models_pull_fetches_a_pipeline_from_the_hub_and_registers_it() {
    let home = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux/tiny-schnell");
    let port = fake_hub("owner/tiny-schnell", tiny.clone());
    let hf_home = home.path().join("hf-home");
    let pull = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["models", "pull", "owner/tiny-schnell"])
            .args(args)
            .env("KILN_HOME", home.path())
            .env("KILN_LOG", "warn")
            .env("HF_HOME", &hf_home)
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("KILN_PULL_PRIVATE_HOSTS", "127.0.0.1")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    let out = pull(&["--name", "art.flux.schnell", "--alias", "champion"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pulled owner/tiny-schnell into"),
        "{stdout}"
    );
    assert!(
        stdout.contains("registered models:/art.flux.schnell/1"),
        "{stdout}"
    );
    let snapshot = hf_home.join("hub/models--owner--tiny-schnell/snapshots");
    assert!(snapshot.is_dir(), "nothing in {}", hf_home.display());
    let shown = ok(
        home.path(),
        &["models", "show", "art.flux.schnell", "--json"],
    );
    assert!(shown.contains("champion"), "{shown}");

    let out = pull(&["--only", "tokenizer", "--name", "art.flux.partial"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--only"),
        "{stderr}"
    );
    // Without the loopback host trusted, the pull is refused before any request.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["models", "pull", "owner/tiny-schnell"])
        .env("KILN_HOME", home.path())
        .env("HF_HOME", home.path().join("other-hf"))
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("127.0.0.1"),
        "{stderr}"
    );
}
