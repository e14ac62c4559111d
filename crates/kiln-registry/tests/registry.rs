//! Registry behaviour as a user sees it: versions, aliases, tags, deletion,
//! integrity checks and concurrent writers.

use std::fs;
use std::path::Path;

use kiln_registry::{
    Alias, Error, IntegrityCache, Manifest, ModelName, ModelRef, Registry, Verification,
};

fn model_folder(dir: &Path, weights: &[u8]) {
    fs::create_dir_all(dir.join("weights")).unwrap();
    fs::write(dir.join("weights/params.bin"), weights).unwrap();
    let mut manifest = Manifest::new("tabular/glm");
    manifest.description = "test model".into();
    fs::write(dir.join("manifest.json"), manifest.to_json_bytes()).unwrap();
}

fn name(text: &str) -> ModelName {
    ModelName::parse(text).unwrap()
}

fn resolve(
    registry: &Registry,
    reference: &str,
) -> kiln_registry::Result<kiln_registry::ResolvedModel> {
    registry.resolve(&ModelRef::parse(reference).unwrap(), Verification::Full)
}

#[test]
fn versions_increment_and_references_resolve() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"v1");
    let registry = Registry::open(home.path());
    let glm = name("main.pricing.glm");
    let champion = Alias::parse("champion").unwrap();

    let first = registry
        .register_folder(&glm, source.path(), Some(&champion))
        .unwrap();
    assert_eq!(first.version, Some(1));
    model_folder(source.path(), b"v2");
    let second = registry.register_folder(&glm, source.path(), None).unwrap();
    assert_eq!(second.version, Some(2));

    assert_eq!(
        resolve(&registry, "main.pricing.glm").unwrap().version,
        Some(2)
    );
    assert_eq!(
        resolve(&registry, "models:/main.pricing.glm/1")
            .unwrap()
            .version,
        Some(1)
    );
    let by_alias = resolve(&registry, "models:/main.pricing.glm@champion").unwrap();
    assert_eq!(by_alias.version, Some(1));
    assert_eq!(
        fs::read(by_alias.dir.join("weights/params.bin")).unwrap(),
        b"v1"
    );
    assert_eq!(by_alias.manifest.files.len(), 1);
    assert_eq!(by_alias.manifest.files[0].path, "weights/params.bin");
    assert_eq!(by_alias.manifest.files[0].size, 2);

    registry.set_alias(&glm, &champion, 2).unwrap();
    assert_eq!(
        resolve(&registry, "main.pricing.glm@champion")
            .unwrap()
            .version,
        Some(2)
    );
    registry.delete_alias(&glm, &champion).unwrap();
    assert!(matches!(
        resolve(&registry, "main.pricing.glm@champion"),
        Err(Error::AliasNotFound { .. })
    ));
    assert!(matches!(
        registry.set_alias(&glm, &champion, 9),
        Err(Error::VersionNotFound { version: 9, .. })
    ));

    // A registry version is itself a model folder and can be served by path.
    let by_path = resolve(&registry, second.dir.to_str().unwrap()).unwrap();
    assert_eq!(by_path.manifest.version, Some(2));
}

#[test]
fn deleted_versions_are_never_reused_and_take_their_aliases() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"x");
    let registry = Registry::open(home.path());
    let glm = name("a.b.c");
    let prod = Alias::parse("prod").unwrap();
    registry
        .register_folder(&glm, source.path(), Some(&prod))
        .unwrap();
    registry.register_folder(&glm, source.path(), None).unwrap();
    registry.delete_version(&glm, 1).unwrap();
    assert!(registry.record(&glm).unwrap().aliases.is_empty());
    assert_eq!(
        registry
            .register_folder(&glm, source.path(), None)
            .unwrap()
            .version,
        Some(3)
    );
    assert_eq!(registry.version_numbers(&glm).unwrap(), vec![2, 3]);
    registry.delete_model(&glm).unwrap();
    assert!(matches!(
        resolve(&registry, "a.b.c"),
        Err(Error::ModelNotFound(_))
    ));
    assert!(registry.list().unwrap().is_empty());
}

#[test]
fn tags_on_models_and_versions() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"x");
    let registry = Registry::open(home.path());
    let glm = name("a.b.c");
    registry.register_folder(&glm, source.path(), None).unwrap();
    registry
        .set_tag(&glm, None, "owner", Some("pricing"))
        .unwrap();
    registry
        .set_tag(&glm, Some(1), "validated", Some("true"))
        .unwrap();
    assert_eq!(registry.record(&glm).unwrap().tags["owner"], "pricing");
    assert_eq!(
        registry.versions(&glm).unwrap()[0].tags["validated"],
        "true"
    );
    registry.set_tag(&glm, None, "owner", None).unwrap();
    assert!(registry.record(&glm).unwrap().tags.is_empty());
    assert!(registry.set_tag(&glm, Some(7), "k", Some("v")).is_err());
}

#[test]
fn tampered_artifacts_fail_the_integrity_check_naming_the_file() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"original");
    let registry = Registry::open(home.path());
    let published = registry
        .register_folder(&name("a.b.c"), source.path(), None)
        .unwrap();

    fs::write(published.dir.join("weights/params.bin"), b"ORIGINAL").unwrap();
    let err = resolve(&registry, "a.b.c").unwrap_err().to_string();
    assert!(
        err.contains("weights/params.bin") && err.contains("sha256"),
        "{err}"
    );
    // Same size: only a full check notices.
    assert!(
        registry
            .resolve(&ModelRef::parse("a.b.c").unwrap(), Verification::SizeOnly)
            .is_ok()
    );

    fs::write(published.dir.join("weights/params.bin"), b"short").unwrap();
    let err = resolve(&registry, "a.b.c").unwrap_err().to_string();
    assert!(err.contains("size is 5 bytes"), "{err}");
}

#[test]
fn a_reload_verifies_files_rewritten_since_the_last_check() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"original");
    let registry = Registry::open(home.path());
    let published = registry
        .register_folder(&name("a.b.c"), source.path(), None)
        .unwrap();
    let located = registry.locate(&ModelRef::parse("a.b.c").unwrap()).unwrap();
    let cache = IntegrityCache::new();
    cache.verify(&located, Verification::Full).unwrap();
    cache.verify(&located, Verification::Full).unwrap();

    // Same size, and the modification time put back: the change time and the
    // new inode of a replaced file still give it away.
    let weights = published.dir.join("weights/params.bin");
    let modified = fs::metadata(&weights).unwrap().modified().unwrap();
    let replacement = published.dir.join("weights/params.new");
    fs::write(&replacement, b"ORIGINAL").unwrap();
    fs::rename(&replacement, &weights).unwrap();
    fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let err = cache
        .verify(&located, Verification::Full)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256"), "{err}");

    // Written in place, same size.
    fs::write(&weights, b"original").unwrap();
    cache.verify(&located, Verification::Full).unwrap();
    fs::write(&weights, b"0riginal").unwrap();
    assert!(cache.verify(&located, Verification::Full).is_err());
}

#[test]
fn unknown_models_and_folders_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::open(home.path());
    let err = resolve(&registry, "no.such.model").unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), "model no.such.model is not registered");
    let empty = tempfile::tempdir().unwrap();
    let err = registry
        .register_folder(&name("a.b.c"), empty.path(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no manifest.json"), "{err}");
    assert!(
        registry.list().unwrap().is_empty(),
        "a failed register leaves nothing behind"
    );
}

#[test]
fn concurrent_writers_get_distinct_versions() {
    let home = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    model_folder(source.path(), b"x");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let home = home.path().to_path_buf();
            let source = source.path().to_path_buf();
            std::thread::spawn(move || {
                Registry::open(&home)
                    .register_folder(&name("a.b.c"), &source, None)
                    .unwrap()
                    .version
                    .unwrap()
            })
        })
        .collect();
    let mut versions: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    let registry = Registry::open(home.path());
    assert_eq!(registry.version_numbers(&name("a.b.c")).unwrap(), versions);
    assert_eq!(registry.record(&name("a.b.c")).unwrap().next_version, 9);
}
