//! Typed configuration: a TOML file, then environment overrides, then command-line overrides.
//!
//! - Unknown keys are rejected (every config struct uses `#[serde(deny_unknown_fields)]`).
//! - The environment is passed in as a map, so tests never touch the process environment.
//!   `PIXMESH__GATEWAY__LISTEN=127.0.0.1:9000` sets `gateway.listen`; a value is read as TOML
//!   when it parses as a TOML value (`3`, `true`, `["a"]`) and as a string otherwise.
//! - Overrides are `dotted.key = value` pairs, e.g. from flags.
//! - The result is validated before any port is bound ([`Validate`]).

use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Prefix of environment variables that override configuration; `__` separates path segments.
pub const ENV_PREFIX: &str = "PIXMESH__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config override `{key}`: {message}")]
    Override { key: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Checks that cannot be expressed in types (ranges, cross-field rules).
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// Builds a config of type `T` from an optional file, an environment map and overrides.
pub fn load<T>(file: Option<&Path>, env: &HashMap<String, String>, overrides: &[(String, toml::Value)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let mut root = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            text.parse::<toml::Table>().map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?
        }
        None => toml::Table::new(),
    };
    let mut env_pairs: Vec<(&String, &String)> = env.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    env_pairs.sort();
    for (key, raw) in env_pairs {
        let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        set_path(&mut root, &path, scalar(raw)).map_err(|message| ConfigError::Override { key: key.clone(), message })?;
    }
    for (key, value) in overrides {
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        set_path(&mut root, &path, value.clone()).map_err(|message| ConfigError::Override { key: key.clone(), message })?;
    }
    let config: T = toml::Value::Table(root).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
    config.validate().map_err(ConfigError::Invalid)?;
    Ok(config)
}

/// Reads an override value: TOML if it parses as a TOML value, a plain string otherwise.
pub fn scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    if path.iter().any(String::is_empty) {
        return Err("empty key segment".into());
    }
    let mut table = root;
    for segment in parents {
        let entry = table.entry(segment.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{segment}` is not a table")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        port: u16,
        #[serde(default)]
        name: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default = "default_inner")]
        inner: Inner,
        #[serde(default)]
        workers: u32,
    }

    fn default_inner() -> Inner {
        Inner { port: 1, name: String::new() }
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), String> {
            if self.workers > 64 { Err("workers must be at most 64".into()) } else { Ok(()) }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn file_then_env_then_overrides() {
        let dir = std::env::temp_dir().join(format!("pixmesh-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "workers = 2\n[inner]\nport = 10\nname = \"file\"\n").unwrap();
        let cfg: Cfg =
            load(Some(&file), &env(&[("PIXMESH__INNER__PORT", "20"), ("OTHER", "x")]), &[("workers".into(), toml::Value::Integer(3))])
                .unwrap();
        assert_eq!(cfg, Cfg { inner: Inner { port: 20, name: "file".into() }, workers: 3 });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_invalid_values_are_rejected() {
        let err = load::<Cfg>(None, &env(&[("PIXMESH__INNER__PROT", "20")]), &[]).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        let err = load::<Cfg>(None, &env(&[("PIXMESH__WORKERS", "100")]), &[]).unwrap_err();
        assert!(err.to_string().contains("at most 64"), "{err}");
        let err = load::<Cfg>(None, &env(&[("PIXMESH__WORKERS", "many")]), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = load::<Cfg>(Some(Path::new("/nonexistent/pixmesh.toml")), &HashMap::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");
    }

    #[test]
    fn scalars_parse_as_toml_or_string() {
        assert_eq!(scalar("3"), toml::Value::Integer(3));
        assert_eq!(scalar("true"), toml::Value::Boolean(true));
        assert_eq!(scalar("127.0.0.1:80"), toml::Value::String("127.0.0.1:80".into()));
    }
}
