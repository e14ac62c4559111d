//! LoRA sources (and input images given as URLs) over the network, against a
//! loopback server (`common`): URL
//! downloads into the disk cache (keyed by the URL's SHA-256, fetched once
//! under concurrency), the redirect, host, scheme and size guards, CivitAI's
//! API with its token, and Hugging Face ids through hf-hub into the HF cache.

mod common;

use common::{COMMIT, server};
use kiln_pipelines::lora::sources::{LoraCache, locate};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn error(result: Result<impl std::fmt::Debug, kiln_pipelines::PipelineError>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn url_downloads_are_cached_by_url_and_fetched_once_by_concurrent_requests() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let settings = server.settings(cache.path());
    let url = server.url("/files/style.safetensors?case=concurrent");
    let located: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| locate("loras[0]", &url, &settings).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(server.hits("/files/style.safetensors?case=concurrent"), 1);
    let first = &located[0];
    assert!(located.iter().all(|l| l == first));
    let key = hex(&Sha256::digest(url.as_bytes()));
    assert_eq!(
        first.path,
        cache.path().join(format!("loras/{key}.safetensors"))
    );
    assert_eq!(std::fs::read(&first.path).unwrap(), server.style);
    assert_eq!(
        first.sha256.as_deref(),
        Some(hex(&Sha256::digest(&server.style)).as_str())
    );
    assert_eq!(first.origin.as_deref(), Some(url.as_str()));

    // Cached: no second fetch, and the record still gives the file's hash.
    let again = locate("loras[0]", &url, &settings).unwrap();
    assert_eq!(&again, first);
    assert_eq!(server.hits("/files/style.safetensors?case=concurrent"), 1);

    // The parsed file matches the local copy's.
    let parsed = LoraCache::new(1 << 30)
        .get("loras[0]", &first.path)
        .unwrap();
    let local = kiln_pipelines::lora::read(&common::fixtures().join("lora/style_peft.safetensors"))
        .unwrap();
    assert_eq!(parsed.modules.len(), local.modules.len());
}

#[test]
fn same_host_redirects_are_followed_but_never_to_untrusted_internal_addresses() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let settings = server.settings(cache.path());
    let followed = locate("lora_weights", &server.url("/redirect/ok"), &settings).unwrap();
    assert_eq!(std::fs::read(&followed.path).unwrap(), server.style);

    // localhost resolves to loopback and is not among the trusted hosts.
    let refused = error(locate(
        "lora_weights",
        &server.url("/redirect/loopback"),
        &settings,
    ));
    assert!(
        refused.contains("lora_weights") && refused.contains("internal address"),
        "{refused}"
    );
    let looping = error(locate(
        "lora_weights",
        &server.url("/redirect/loop"),
        &settings,
    ));
    assert!(looping.contains("too many redirects"), "{looping}");
}

#[test]
fn bad_urls_are_clear_errors_that_leave_nothing_behind() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let mut settings = server.settings(cache.path());
    let localhost = format!("http://localhost:{}/files/style.safetensors", server.port);
    let not_allowed = error(locate("loras[1]", &localhost, &settings));
    assert!(
        not_allowed.contains("loras[1]")
            && not_allowed.contains("not in the allowed hosts")
            && not_allowed.contains("KILN_LORA_ALLOWED_HOSTS"),
        "{not_allowed}"
    );
    let missing = error(locate(
        "loras[0]",
        &server.url("/missing.safetensors"),
        &settings,
    ));
    assert!(missing.contains("answered 404"), "{missing}");
    // A missing file is the request's mistake; a host that cannot be reached
    // is the upstream's (the server answers 502 for it, not 400).
    assert!(matches!(
        locate("loras[0]", &server.url("/missing.safetensors"), &settings),
        Err(kiln_pipelines::PipelineError::InvalidInput(_))
    ));
    let closed = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}/x.safetensors")
    };
    match locate("loras[0]", &closed, &settings) {
        Err(kiln_pipelines::PipelineError::Upstream {
            field,
            message,
            timed_out: false,
        }) => {
            assert_eq!(field, "loras[0]");
            assert!(message.contains("network error"), "{message}");
        }
        other => panic!("an unreachable host is an upstream failure: {other:?}"),
    }

    settings.policy.max_bytes = 1024;
    let big = error(locate(
        "loras[0]",
        &server.url("/big.safetensors"),
        &settings,
    ));
    assert!(big.contains("larger than the 1024-byte limit"), "{big}");

    // Plain http only for trusted private hosts (refused before connecting).
    settings.policy.allowed_hosts.push("192.0.2.1".into());
    let plain = error(locate(
        "loras[0]",
        "http://192.0.2.1/x.safetensors",
        &settings,
    ));
    assert!(plain.contains("only https"), "{plain}");

    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("loras"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A downloaded pickle is refused when parsed, not executed.
    settings.policy.max_bytes = 1 << 20;
    let pickle = locate("loras[0]", &server.url("/pickle.safetensors"), &settings).unwrap();
    let refused = error(LoraCache::new(1 << 20).get("loras[0]", &pickle.path));
    assert!(refused.contains("pickle"), "{refused}");
}

#[test]
fn civitai_models_resolve_to_their_newest_version_with_the_token() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let mut settings = server.settings(cache.path());
    settings
        .policy
        .tokens
        .push(("127.0.0.1".into(), "civitai-secret".into()));
    let located = locate(
        "lora_weights",
        &server.url("/models/77/some-style"),
        &settings,
    )
    .unwrap();
    assert_eq!(std::fs::read(&located.path).unwrap(), server.style);
    assert_eq!(
        located.origin.as_deref(),
        Some(
            server
                .url("/api/download/models/456?type=Model&format=SafeTensor")
                .as_str()
        )
    );
    assert_eq!(
        server.auth_for("/api/v1/models/77"),
        ["Bearer civitai-secret"]
    );
    assert_eq!(
        server.auth_for("/api/download/models/456"),
        ["Bearer civitai-secret"]
    );
}

#[test]
fn hub_ids_download_through_hf_hub_into_the_hf_cache() {
    let server = server();
    let cache = tempfile::tempdir().unwrap();
    let settings = server.settings(cache.path());
    let located = locate("lora_path", "owner/repo", &settings).unwrap();
    assert_eq!(
        located.origin.as_deref(),
        Some("hf:owner/repo/style.safetensors")
    );
    assert_eq!(
        located.path,
        cache.path().join(format!(
            "hf/models--owner--repo/snapshots/{COMMIT}/style.safetensors"
        ))
    );
    assert_eq!(std::fs::read(&located.path).unwrap(), server.style);
    let resolves = server.hits("/owner/repo/resolve/main/style.safetensors");
    // Naming the file finds it in the HF cache without asking the server.
    let again = locate("lora_path", "owner/repo/style.safetensors", &settings).unwrap();
    assert_eq!(again.path, located.path);
    assert_eq!(
        server.hits("/owner/repo/resolve/main/style.safetensors"),
        resolves
    );

    let missing = error(locate(
        "lora_path",
        "owner/repo/other.safetensors",
        &settings,
    ));
    assert!(
        missing.contains("lora_path") && missing.contains("404"),
        "{missing}"
    );
}

#[test]
fn input_images_given_as_urls_are_fetched_through_the_guard() {
    use kiln_pipelines::text_to_image::image_io::{InputSources, read_image};
    let server = server();
    let sources = InputSources {
        dirs: Vec::new(),
        policy: server.settings(std::path::Path::new("/nonexistent")).policy,
    };
    let image = read_image("image", &server.url("/files/input.png"), &sources, 1 << 20).unwrap();
    assert_eq!((image.width, image.height), (24, 16));
    assert_eq!(image.decode().unwrap().get_pixel(0, 0).0, [200, 40, 10]);

    // A host off the list is the request's mistake, naming the setting.
    let elsewhere = InputSources {
        dirs: Vec::new(),
        policy: kiln_fetch::Policy::default(),
    };
    let refused = error(read_image(
        "image",
        &server.url("/files/input.png"),
        &elsewhere,
        1 << 20,
    ));
    assert!(
        refused.contains("image") && refused.contains("KILN_INPUT_ALLOWED_HOSTS"),
        "{refused}"
    );
    // A host that fails is the upstream's (502), not a 400.
    assert!(matches!(
        read_image("image", &server.url("/files/broken"), &sources, 1 << 20),
        Err(kiln_pipelines::PipelineError::Upstream { .. })
    ));
}
