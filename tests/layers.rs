//! The architecture layer stands alone (issue 23): `arch` imports neither
//! the model, the config nor the exporters; the config does not import the
//! model or the exporters; the model does not import the exporters or the
//! training step. A read of the sources, unit tests (`#[cfg(test)]` onward)
//! and comments aside, so a new import that closes a loop fails here.

use std::path::Path;

/// `crate::` paths that `file`'s code (not its tests or comments) names.
fn imports(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap();
    let mut found = Vec::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

fn assert_no_imports(files: &[std::path::PathBuf], banned: &[&str]) {
    assert!(!files.is_empty());
    for f in files {
        let bad: Vec<_> = imports(f)
            .into_iter()
            .filter(|m| banned.contains(&m.as_str()))
            .collect();
        assert!(bad.is_empty(), "{} imports {bad:?}", f.display());
    }
}

fn src(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

#[test]
fn arch_imports_no_higher_layer() {
    let files: Vec<_> = std::fs::read_dir(src("arch"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    assert!(files.len() >= 10, "{files:?}");
    assert_no_imports(
        &files,
        &[
            "model",
            "config",
            "export",
            "train",
            "sparse_step",
            "penalty",
            "sweep",
            "cli",
        ],
    );
}

#[test]
fn config_and_model_import_no_higher_layer() {
    assert_no_imports(
        &[
            src("config.rs"),
            src("normalize.rs"),
            src("sparse_codes.rs"),
        ],
        &[
            "model",
            "export",
            "train",
            "sparse_step",
            "penalty",
            "sweep",
            "cli",
        ],
    );
    assert_no_imports(
        &[src("model.rs")],
        &["export", "train", "sparse_step", "penalty", "sweep", "cli"],
    );
}
