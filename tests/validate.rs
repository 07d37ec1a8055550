//! `tollgate validate`: one fixture per bad case, the exact messages asserted; every shipped
//! config validates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

fn validate(file: &str) -> (i32, String) {
    let out = Command::new(common::bin())
        .arg("validate")
        .arg(file)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tollgate validate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn expect_problems(name: &str) {
    let file = format!("tests/fixtures/{name}.yaml");
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.expected")),
    )
    .unwrap();
    let (code, stdout) = validate(&file);
    assert_eq!(code, 1, "{name}: exit code");
    assert_eq!(stdout, expected, "{name}: messages");
    for line in stdout.lines() {
        assert!(
            line.starts_with(&format!("{file}: ")),
            "{line}: names the file"
        );
    }
}

#[test]
fn syntax_error_names_line_and_column() {
    expect_problems("bad-syntax");
}

#[test]
fn unknown_field_names_path_line_and_column() {
    expect_problems("bad-unknown-field");
}

#[test]
fn unknown_enum_value() {
    expect_problems("bad-enum");
}

#[test]
fn missing_routes() {
    expect_problems("bad-missing-routes");
}

#[test]
fn bad_rate_names_the_field_path() {
    expect_problems("bad-rate");
}

#[test]
fn every_problem_is_reported_once() {
    expect_problems("bad-many");
}

#[test]
fn bad_regex() {
    expect_problems("bad-regex");
}

#[test]
fn path_params_duplicates_and_empty_overrides() {
    expect_problems("bad-path-param");
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, stdout) = validate("tests/fixtures/does-not-exist.yaml");
    assert_eq!(code, 1);
    assert!(
        stdout.starts_with("tests/fixtures/does-not-exist.yaml: cannot read the file"),
        "{stdout}"
    );
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml")
            && !path.to_string_lossy().contains("prometheus")
        {
            let (code, stdout) = validate(path.to_str().unwrap());
            assert_eq!((code, stdout.as_str()), (0, "ok\n"), "{}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "config/ holds the demo and the example gateway config"
    );
}

#[test]
fn batch_window_must_leave_time_for_the_call() {
    expect_problems("bad-batch-window");
}

/// Issue 9: flow nesting made the YAML scanner quadratic (80 KB took seconds); it is refused
/// before parsing, with its line and column.
#[test]
fn nesting_past_the_cap_is_refused_before_parsing() {
    let start = std::time::Instant::now();
    expect_problems("bad-deep-nesting");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

/// A few KB of aliases of aliases would expand to a million nodes (gigabytes); refused.
#[test]
fn alias_expansion_is_bounded() {
    let start = std::time::Instant::now();
    expect_problems("bad-alias-bomb");
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_file_over_the_size_cap_is_refused_unparsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let mut text = String::from("routes: []\n");
    while text.len() <= 4 * 1024 * 1024 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, &text).unwrap();
    let (code, stdout) = validate(path.to_str().unwrap());
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        format!(
            "{}: the file is {} bytes; the limit is 4194304 bytes\n",
            path.display(),
            text.len()
        )
    );
}
