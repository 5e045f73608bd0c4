//! The development API key `pixmesh up` creates on first start.

use std::io::Write;
use std::path::Path;

/// Hashed keys the gateway reads (`[[keys]] name, sha256`).
pub const KEYS_FILE: &str = "api-keys.toml";
/// The plain development key, readable only by its owner, so `up` can print it on every start.
pub const DEV_KEY_FILE: &str = "dev-api-key";

pub enum DevKey {
    Created(String),
    Existing(String),
    /// A keys file exists but no development key: the operator manages keys.
    Unknown,
}

impl DevKey {
    pub fn plain(&self) -> Option<&str> {
        match self {
            DevKey::Created(k) | DevKey::Existing(k) => Some(k),
            DevKey::Unknown => None,
        }
    }
}

fn sha256_hex(s: &str) -> String {
    pixmesh_gateway::keys::hash_key(s)
}

pub fn ensure_dev_key(data_dir: &Path) -> std::io::Result<DevKey> {
    let dev = data_dir.join(DEV_KEY_FILE);
    let keys = data_dir.join(KEYS_FILE);
    if let Ok(existing) = std::fs::read_to_string(&dev) {
        return Ok(DevKey::Existing(existing.trim().to_string()));
    }
    if keys.exists() {
        return Ok(DevKey::Unknown);
    }
    let bytes: [u8; 24] = rand::random();
    let key = format!("pxm_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&dev)?;
    writeln!(file, "{key}")?;
    file.sync_all()?;
    let text = format!(
        "# API keys for the pixmesh gateway: name and SHA-256 of each key, and optional limits.\n\
         # The development key gets a generous rate (a local client polling many jobs) and is an\n\
         # admin key (the operator's: it reads the cluster view); edit and the gateway reloads\n\
         # this file by itself.\n[[keys]]\nname = \"dev\"\nsha256 = \"{}\"\nrate = \"1000/s\"\nburst = 2000\nadmin = true\n",
        sha256_hex(&key)
    );
    std::fs::write(&keys, text)?;
    Ok(DevKey::Created(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reuses() {
        let dir = std::env::temp_dir().join(format!("pixmesh-devkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let DevKey::Created(k) = ensure_dev_key(&dir).unwrap() else { panic!("expected a new key") };
        assert!(k.starts_with("pxm_") && k.len() == 52);
        let DevKey::Existing(again) = ensure_dev_key(&dir).unwrap() else { panic!("expected the same key") };
        assert_eq!(k, again);
        let text = std::fs::read_to_string(dir.join(KEYS_FILE)).unwrap();
        assert!(text.contains(&sha256_hex(&k)) && !text.contains(&k), "only the hash is in the keys file");
        std::fs::remove_file(dir.join(DEV_KEY_FILE)).unwrap();
        assert!(matches!(ensure_dev_key(&dir).unwrap(), DevKey::Unknown));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
