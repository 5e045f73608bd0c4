//! API keys, kept as SHA-256 hashes and compared in constant time.

use crate::config::{ApiKeyConfig, GatewayConfig};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone)]
struct Key {
    name: String,
    hash: [u8; 32],
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyConfig>,
}

pub(crate) fn parse_hash(hex_hash: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_hash.trim()).map_err(|_| "sha256 must be 64 hex characters".to_string())?;
    bytes.try_into().map_err(|_| "sha256 must be 64 hex characters".to_string())
}

/// Hex SHA-256 of a key, as stored in configuration.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ApiKeys {
    /// Keys from the config, its keys file, and plain keys (e.g. from the environment).
    pub fn load(config: &GatewayConfig, plain: &[(String, String)]) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::default();
        for k in &config.api_keys {
            keys.add_hashed(&k.name, &k.sha256)?;
        }
        if let Some(path) = &config.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
            let file: KeysFile = toml::from_str(&text).map_err(|e| format!("API keys file {}: {}", path.display(), e.message()))?;
            for k in &file.keys {
                keys.add_hashed(&k.name, &k.sha256)?;
            }
        }
        for (name, key) in plain {
            keys.add_plain(name, key);
        }
        Ok(keys)
    }

    pub fn add_hashed(&mut self, name: &str, sha256: &str) -> Result<(), String> {
        let hash = parse_hash(sha256).map_err(|e| format!("API key {name}: {e}"))?;
        self.keys.push(Key { name: name.to_string(), hash });
        Ok(())
    }

    pub fn add_plain(&mut self, name: &str, key: &str) {
        self.keys.push(Key { name: name.to_string(), hash: Sha256::digest(key.as_bytes()).into() });
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the key, if `presented` is one. Every stored key is compared, in constant
    /// time, so timing does not reveal which key (or how much of one) matched.
    pub fn check(&self, presented: &[u8]) -> Option<&str> {
        let hash: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&hash)) && found.is_none() {
                found = Some(key.name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_hashed_and_plain_keys() {
        let mut keys = ApiKeys::default();
        keys.add_hashed("ci", &hash_key("secret-1")).unwrap();
        keys.add_plain("env", "secret-2");
        assert_eq!(keys.check(b"secret-1"), Some("ci"));
        assert_eq!(keys.check(b"secret-2"), Some("env"));
        assert_eq!(keys.check(b"secret-3"), None);
        assert_eq!(keys.check(b""), None);
        assert!(keys.add_hashed("bad", "zz").is_err());
    }

    #[test]
    fn loads_a_keys_file() {
        let dir = std::env::temp_dir().join(format!("pixmesh-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, format!("[[keys]]\nname = \"dev\"\nsha256 = \"{}\"\n", hash_key("k1"))).unwrap();
        let config = GatewayConfig { api_keys_file: Some(path.clone()), ..GatewayConfig::default() };
        let keys = ApiKeys::load(&config, &[]).unwrap();
        assert_eq!(keys.check(b"k1"), Some("dev"));
        std::fs::write(&path, "[[keys]]\nname = \"dev\"\nsha = \"x\"\n").unwrap();
        assert!(ApiKeys::load(&config, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
