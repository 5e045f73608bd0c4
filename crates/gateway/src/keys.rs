//! API keys, kept as SHA-256 hashes and compared in constant time, each with a name, a rate
//! limiter and optional limits of its own.

use crate::config::{ApiKeyConfig, GatewayConfig, parse_rate};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Per-key overrides of the route limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub max_pixels: Option<u64>,
    pub max_side: Option<u32>,
    pub max_body_bytes: Option<u64>,
    /// Output limits for this key's uploads (what it may ask the pipeline to produce).
    pub max_output_pixels: Option<u64>,
    pub max_output_side: Option<u32>,
    /// The only presets this key may upload with (`None`: any options).
    pub presets: Option<Vec<String>>,
}

/// Who is calling: what the API-key layer hands to the layers after it.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    /// May read every client's jobs, not only its own (`admin = true`).
    pub admin: bool,
    pub limits: KeyLimits,
    /// `None` when the key's rate is "off".
    pub limiter: Option<Arc<DefaultDirectRateLimiter>>,
    quota: Option<Quota>,
}

#[derive(Debug)]
struct Key {
    /// `None` for a client known by its certificate only.
    hash: Option<[u8; 32]>,
    /// The client-certificate name that authenticates as this client.
    tls_name: Option<String>,
    client: Arc<Client>,
}

#[derive(Debug, Default)]
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

/// The GCRA quota for a rate text and burst; `None` for "off".
pub fn quota(rate: &str, burst: u32) -> Result<Option<Quota>, String> {
    let Some(period) = parse_rate(rate)? else { return Ok(None) };
    let burst = NonZeroU32::new(burst).ok_or("burst must be at least 1")?;
    Ok(Quota::with_period(period).map(|q| q.allow_burst(burst)))
}

impl ApiKeys {
    /// Keys from the config, its keys file, and plain keys (e.g. from the environment).
    /// Rate limiters of `previous` keys whose name and quota are unchanged carry over, so a
    /// reload does not hand every client a fresh burst.
    pub fn load(config: &GatewayConfig, plain: &[(String, String)], previous: Option<&ApiKeys>) -> Result<ApiKeys, String> {
        Self::load_with_admins(config, plain, &[], previous)
    }

    /// [`ApiKeys::load`], plus plain keys that are admin keys.
    pub fn load_with_admins(
        config: &GatewayConfig,
        plain: &[(String, String)],
        admins: &[(String, String)],
        previous: Option<&ApiKeys>,
    ) -> Result<ApiKeys, String> {
        let mut entries: Vec<(ApiKeyConfig, Option<[u8; 32]>)> = Vec::new();
        let hash_of = |k: &ApiKeyConfig| -> Result<Option<[u8; 32]>, String> {
            if k.sha256.is_empty() && k.tls_name.is_some() {
                return Ok(None);
            }
            parse_hash(&k.sha256).map(Some).map_err(|e| format!("API key {}: {e}", k.name))
        };
        for k in &config.api_keys {
            entries.push((k.clone(), hash_of(k)?));
        }
        if let Some(path) = &config.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
            let file: KeysFile = toml::from_str(&text).map_err(|e| format!("API keys file {}: {}", path.display(), e.message()))?;
            for k in file.keys {
                k.validate().map_err(|e| format!("API keys file {}: {e}", path.display()))?;
                let hash = hash_of(&k)?;
                entries.push((k, hash));
            }
        }
        for (name, key) in plain {
            entries.push((ApiKeyConfig { name: name.clone(), ..ApiKeyConfig::default() }, Some(Sha256::digest(key.as_bytes()).into())));
        }
        for (name, key) in admins {
            entries.push((
                ApiKeyConfig { name: name.clone(), admin: true, ..ApiKeyConfig::default() },
                Some(Sha256::digest(key.as_bytes()).into()),
            ));
        }
        // Jobs belong to a key's name: two keys with one name would read each other's jobs.
        let mut names: Vec<&str> = entries.iter().map(|(k, _)| k.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("two API keys are named {:?}; key names must be unique (jobs belong to a key's name)", w[0]));
        }
        let mut keys = ApiKeys::default();
        for (k, hash) in entries {
            let rate = k.rate.as_deref().unwrap_or(&config.rate);
            let quota = quota(rate, k.burst.unwrap_or(config.burst)).map_err(|e| format!("API key {}: {e}", k.name))?;
            let limiter = match previous.and_then(|p| p.client_named(&k.name)).filter(|c| c.quota == quota) {
                Some(old) => old.limiter.clone(),
                None => quota.map(|q| Arc::new(RateLimiter::direct(q))),
            };
            let limits = KeyLimits {
                max_pixels: k.max_pixels,
                max_side: k.max_side,
                max_body_bytes: k.max_body_bytes,
                max_output_pixels: k.max_output_pixels,
                max_output_side: k.max_output_side,
                presets: k.presets,
            };
            let tls_name = k.tls_name;
            keys.keys.push(Key { hash, tls_name, client: Arc::new(Client { name: k.name, admin: k.admin, limits, limiter, quota }) });
        }
        Ok(keys)
    }

    fn client_named(&self, name: &str) -> Option<&Arc<Client>> {
        self.keys.iter().map(|k| &k.client).find(|c| c.name == name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The client owning `presented`, if it is a key. Every stored key is compared, in
    /// constant time, so timing does not reveal which key (or how much of one) matched.
    pub fn check(&self, presented: &[u8]) -> Option<&Arc<Client>> {
        let hash: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for key in &self.keys {
            let Some(stored) = &key.hash else { continue };
            if bool::from(stored.ct_eq(&hash)) && found.is_none() {
                found = Some(&key.client);
            }
        }
        found
    }

    /// The client a verified client certificate of this name authenticates as (`tls_name`).
    pub fn by_certificate(&self, name: &str) -> Option<&Arc<Client>> {
        self.keys.iter().find(|k| k.tls_name.as_deref() == Some(name)).map(|k| &k.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(keys: Vec<ApiKeyConfig>) -> GatewayConfig {
        GatewayConfig { api_keys: keys, rate: "10/s".into(), burst: 2, ..GatewayConfig::default() }
    }

    #[test]
    fn checks_hashed_and_plain_keys() {
        let k = ApiKeyConfig { name: "ci".into(), sha256: hash_key("secret-1"), ..Default::default() };
        let keys = ApiKeys::load(&config_with(vec![k]), &[("env".into(), "secret-2".into())], None).unwrap();
        assert_eq!(keys.check(b"secret-1").map(|c| c.name.as_str()), Some("ci"));
        assert_eq!(keys.check(b"secret-2").map(|c| c.name.as_str()), Some("env"));
        assert!(keys.check(b"secret-3").is_none());
        assert!(keys.check(b"").is_none());
        let bad = ApiKeyConfig { name: "bad".into(), sha256: "zz".into(), ..Default::default() };
        assert!(ApiKeys::load(&config_with(vec![bad]), &[], None).is_err());
    }

    #[test]
    fn per_key_limits_and_limiters_survive_a_reload() {
        let slow =
            ApiKeyConfig { name: "slow".into(), sha256: hash_key("s"), rate: Some("1/m".into()), burst: Some(1), ..Default::default() };
        let free = ApiKeyConfig {
            name: "free".into(),
            sha256: hash_key("f"),
            rate: Some("off".into()),
            max_pixels: Some(1920 * 1080),
            ..Default::default()
        };
        let config = config_with(vec![slow.clone(), free]);
        let keys = ApiKeys::load(&config, &[], None).unwrap();
        let s = keys.check(b"s").unwrap();
        assert!(s.limiter.as_ref().unwrap().check().is_ok());
        assert!(s.limiter.as_ref().unwrap().check().is_err(), "burst of one");
        let f = keys.check(b"f").unwrap();
        assert!(f.limiter.is_none());
        assert_eq!(f.limits.max_pixels, Some(1920 * 1080));

        // Same quota: the limiter (and its spent burst) carries over.
        let reloaded = ApiKeys::load(&config, &[], Some(&keys)).unwrap();
        assert!(reloaded.check(b"s").unwrap().limiter.as_ref().unwrap().check().is_err());
        // A new quota starts fresh.
        let faster = ApiKeyConfig { rate: Some("5/s".into()), ..slow };
        let reloaded = ApiKeys::load(&config_with(vec![faster]), &[], Some(&keys)).unwrap();
        assert!(reloaded.check(b"s").unwrap().limiter.as_ref().unwrap().check().is_ok());
    }

    #[test]
    fn a_client_may_be_known_by_its_certificate_name_alone() {
        let by_cert = ApiKeyConfig { name: "billing".into(), tls_name: Some("billing.internal".into()), ..Default::default() };
        let both =
            ApiKeyConfig { name: "ops".into(), sha256: hash_key("o"), tls_name: Some("spiffe://x/ops".into()), ..Default::default() };
        let keys = ApiKeys::load(&config_with(vec![by_cert, both]), &[], None).unwrap();
        assert_eq!(keys.by_certificate("billing.internal").unwrap().name, "billing");
        assert_eq!(keys.by_certificate("spiffe://x/ops").unwrap().name, "ops");
        assert_eq!(keys.check(b"o").unwrap().name, "ops");
        assert!(keys.by_certificate("billing").is_none(), "the certificate's name, not the client's");
        assert!(keys.check(b"").is_none(), "a certificate-only client has no key to match");
        let neither = ApiKeyConfig { name: "x".into(), ..Default::default() };
        assert!(neither.validate().unwrap_err().contains("64 hex"));
    }

    #[test]
    fn loads_a_keys_file() {
        let dir = std::env::temp_dir().join(format!("pixmesh-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, format!("[[keys]]\nname = \"dev\"\nsha256 = \"{}\"\nmax_side = 1920\n", hash_key("k1"))).unwrap();
        let config = GatewayConfig { api_keys_file: Some(path.clone()), ..GatewayConfig::default() };
        let keys = ApiKeys::load(&config, &[], None).unwrap();
        assert_eq!(keys.check(b"k1").unwrap().limits.max_side, Some(1920));
        std::fs::write(&path, "[[keys]]\nname = \"dev\"\nsha = \"x\"\n").unwrap();
        assert!(ApiKeys::load(&config, &[], None).is_err());
        std::fs::write(&path, format!("[[keys]]\nname = \"dev\"\nsha256 = \"{}\"\nrate = \"lots\"\n", hash_key("k1"))).unwrap();
        assert!(ApiKeys::load(&config, &[], None).unwrap_err().contains("rate"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
