//! Model files that are broken or change under a running server: register
//! refuses truncated safetensors and pickles; `kiln serve` reports a model
//! that fails its integrity check (or is unknown) and serves the others; a
//! reload after idle unloading re-verifies rewritten weights.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fails, fit_and_register, get, get_path, invoke, ok, serve};

/// Register a GLM whose folder also carries an artifact file (a GLM's
/// coefficients live in its manifest), and return that file's registered path.
fn register_with_artifact(home: &Path, name: &str) -> PathBuf {
    fit_and_register(home, "scratch.glm.source", "base");
    let source = home.join("registry/models/scratch/glm/source/versions/1");
    let folder = home.join(format!("folder-{name}"));
    std::fs::create_dir_all(folder.join("artifacts")).unwrap();
    std::fs::copy(source.join("manifest.json"), folder.join("manifest.json")).unwrap();
    std::fs::write(
        folder.join("artifacts/notes.txt"),
        "fitted on claims.csv 0\n",
    )
    .unwrap();
    ok(
        home,
        &[
            "models",
            "register",
            name,
            "--from",
            folder.to_str().unwrap(),
            "--alias",
            "champion",
        ],
    );
    let version = home
        .join("registry/models")
        .join(name.replace('.', "/"))
        .join("versions");
    let newest = std::fs::read_dir(&version)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    let file = newest.join("artifacts/notes.txt");
    assert!(file.is_file(), "{}", file.display());
    file
}

#[test]
fn register_refuses_truncated_safetensors_and_pickles_naming_the_file() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    fit_and_register(home, "scratch.glm.source", "base");
    let source = home.join("registry/models/scratch/glm/source/versions/1/manifest.json");
    let folder = home.join("folder");
    std::fs::create_dir_all(folder.join("weights")).unwrap();
    std::fs::copy(&source, folder.join("manifest.json")).unwrap();
    // A header for 16 bytes of F32 data, with only 8 of them present.
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 8]);
    std::fs::write(folder.join("weights/model.safetensors"), &file).unwrap();
    let register = [
        "models",
        "register",
        "main.bad.model",
        "--from",
        folder.to_str().unwrap(),
    ];
    let error = fails(home, &register);
    assert!(error.contains("weights/model.safetensors"), "{error}");

    file.extend_from_slice(&[0u8; 8]);
    std::fs::write(folder.join("weights/model.safetensors"), &file).unwrap();
    std::fs::write(folder.join("weights/pytorch_model.bin"), b"\x80\x02junk").unwrap();
    let error = fails(home, &register);
    assert!(
        error.contains("weights/pytorch_model.bin") && error.contains("pickle"),
        "{error}"
    );
    std::fs::remove_file(folder.join("weights/pytorch_model.bin")).unwrap();
    ok(home, &register);
}

/// Flip one byte of a file, keeping its size.
fn tamper(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_model_that_fails_its_check_is_reported_and_the_others_are_served() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    register_with_artifact(home, "main.pricing.good");
    tamper(&register_with_artifact(home, "main.pricing.bad"));
    let config = home.join("kiln.toml");
    std::fs::write(
        &config,
        r#"
[[models]]
source = "models:/main.pricing.good@champion"
[[models]]
source = "models:/main.pricing.bad@champion"
[[models]]
source = "models:/main.pricing.missing@champion"
load = "lazy"
"#,
    )
    .unwrap();
    let (_server, port) = serve(home, &["--config", config.to_str().unwrap()]);

    let reply = invoke(
        port,
        r#"{"dataframe_split": {"columns": ["driver_age", "region", "urban", "exposure"], "data": [[30, "north", 1, 1.0]]}}"#,
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let bad = get_path(port, "/v2/models/main.pricing.bad/ready");
    assert!(
        bad.starts_with("HTTP/1.1 503") && bad.contains("sha256"),
        "{bad}"
    );
    let health = get_path(port, "/v2/health/ready");
    assert!(
        health.contains("\"failed_models\"") && health.contains("main.pricing.bad"),
        "{health}"
    );
    // The unknown (lazy) model answers 503 with the reason once asked for.
    let body = r#"{"dataframe_split": {"columns": ["driver_age"], "data": [[30]]}}"#;
    let missing = get(
        port,
        &format!("POST /invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-kiln-model: main.pricing.missing\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    )
    .unwrap();
    assert!(
        missing.starts_with("HTTP/1.1 503") && missing.contains("not registered"),
        "{missing}"
    );
    // Cog serves the first model: ready, whatever the others did.
    let cog = get_path(port, "/health-check");
    assert!(cog.contains("\"READY\""), "{cog}");
    assert!(get_path(port, "/docs").contains("swagger-ui"));
}

#[test]
fn weights_rewritten_while_a_model_was_unloaded_are_not_served() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let notes = register_with_artifact(home, "main.pricing.claims");
    let config = home.join("kiln.toml");
    std::fs::write(
        &config,
        r#"
[[models]]
source = "models:/main.pricing.claims@champion"
idle_unload = "1s"
"#,
    )
    .unwrap();
    let (_server, port) = serve(home, &["--config", config.to_str().unwrap()]);
    let body = r#"{"dataframe_split": {"columns": ["driver_age", "region", "urban", "exposure"], "data": [[30, "north", 1, 1.0]]}}"#;
    assert!(invoke(port, body).starts_with("HTTP/1.1 200"));
    tamper(&notes);
    // Unloaded after a second idle (checked every second), then loaded again.
    std::thread::sleep(Duration::from_millis(2500));
    let reply = invoke(port, body);
    assert!(
        reply.starts_with("HTTP/1.1 503") && reply.contains("sha256"),
        "{reply}"
    );
}
