//! Configuration: reading the YAML file, validating it into the model the gateway runs on,
//! and reporting every problem with file, field path and (for syntax errors) line and column.
//!
//! Parts: [`raw`] (serde wire structs), [`model`] (validated model), [`error`], [`limits`]
//! (size, nesting and alias caps checked before the YAML parser runs), [`rls`] (the rate-limit
//! service's domains and descriptor trees).

pub mod error;
pub mod limits;
pub mod locate;
pub mod model;
pub mod raw;
pub mod rls;
pub mod watch;

pub use error::{ConfigError, Problem};
pub use model::Config;

use std::path::Path;

/// Parses and validates YAML text; `file` names the source in messages. The [`limits`] are
/// checked first. Blocking and possibly slow (and validation may resolve host names): a
/// reload runs it on the blocking pool.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    limits::check(text).map_err(|problem| ConfigError::Invalid {
        file: file.to_string(),
        problems: vec![problem],
    })?;
    let raw: raw::RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
        file: file.to_string(),
        problems: vec![yaml_problem(&e)],
    })?;
    model::build(raw).map_err(|mut problems| {
        let found = locate::locate(text);
        for p in &mut problems {
            p.location = locate::lookup(&found, &p.path);
        }
        ConfigError::Invalid {
            file: file.to_string(),
            problems,
        }
    })
}

/// Reads, parses and validates a file. `TOLLGATE_ADMIN_TOKEN`, when set, replaces `admin.token`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read(path)?;
    load_text(&text, path)
}

/// Reads a config file's text; a file over [`limits::MAX_CONFIG_BYTES`] is refused unread.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let failed = |source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let cap = limits::MAX_CONFIG_BYTES as u64;
    let too_large = |bytes| ConfigError::Invalid {
        file: path.display().to_string(),
        problems: vec![limits::too_large(bytes)],
    };
    let size = file.metadata().map_err(failed)?.len();
    if size > cap {
        return Err(too_large(size));
    }
    let mut text = String::new();
    // The file may grow between the size check and the read.
    file.take(cap + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > cap {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

/// Parses and validates text read from `path`, with environment overrides applied.
pub fn load_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut config = parse(text, &path.display().to_string())?;
    apply_env(&mut config);
    Ok(config)
}

/// A digest of a file's text, to tell a real change from an event that changed nothing.
pub fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Environment overrides that apply to every loaded config.
pub fn apply_env(config: &mut Config) {
    if let Ok(token) = std::env::var("TOLLGATE_ADMIN_TOKEN") {
        if !token.is_empty() {
            config.admin.token = Some(token);
        }
    }
}

fn yaml_problem(e: &serde_yaml_ng::Error) -> Problem {
    let text = e.to_string();
    // serde_yaml_ng appends " at line L column C"; the location is reported separately.
    let message = match text.find(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text.clone(),
    };
    Problem {
        path: String::new(),
        message,
        location: e.location().map(|l| (l.line(), l.column())),
    }
}
