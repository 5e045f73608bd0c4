//! The one configuration of a pixmesh deployment: a section per role, plus logs and storage.
//! The whole file is checked by every role, so a typo fails fast wherever it is.

use pixmesh_ambassador::redis::AmbassadorConfig;
use pixmesh_chassis::clock::ChassisConfig;
use pixmesh_chassis::config::Validate;
use pixmesh_chassis::telemetry::LogConfig;
use pixmesh_distributor::DistributorConfig;
use pixmesh_gateway::GatewayConfig;
use pixmesh_queue::QueueConfig;
use pixmesh_registry::RegistryConfig;
use pixmesh_sidecar::SidecarConfig;
use pixmesh_status::StatusConfig;
use pixmesh_store::StoreConfig;
use pixmesh_upload::UploadConfig;
use pixmesh_worker::WorkerConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub log: LogConfig,
    pub chassis: ChassisConfig,
    pub store: StoreConfig,
    pub queue: QueueConfig,
    pub gateway: GatewayConfig,
    pub upload: UploadConfig,
    pub status: StatusConfig,
    pub distributor: DistributorConfig,
    pub worker: WorkerConfig,
    pub registry: RegistryConfig,
    pub ambassador: AmbassadorConfig,
    pub sidecar: SidecarConfig,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        self.log.validate()?;
        self.chassis.validate()?;
        self.store.validate()?;
        self.queue.validate()?;
        self.gateway.validate()?;
        self.upload.validate()?;
        self.status.validate()?;
        self.distributor.validate()?;
        self.worker.validate()?;
        self.registry.validate()?;
        self.ambassador.validate()?;
        self.sidecar.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_are_valid_and_typos_are_caught() {
        let env = HashMap::new();
        let config: Config = pixmesh_chassis::config::load(None, &env, &[]).unwrap();
        assert_eq!(config.gateway.listen.port(), 8080);
        let typo = [("PIXMESH__WORKER__THREADZ".to_string(), "2".to_string())].into_iter().collect();
        let err = pixmesh_chassis::config::load::<Config>(None, &typo, &[]).unwrap_err();
        assert!(err.to_string().contains("threadz"), "{err}");
        let bad = [("PIXMESH__DISTRIBUTOR__CALL_TIMEOUT_MS".to_string(), "999999".to_string())].into_iter().collect();
        let err = pixmesh_chassis::config::load::<Config>(None, &bad, &[]).unwrap_err();
        assert!(err.to_string().contains("max_claim_ms"), "{err}");
    }

    #[test]
    fn tls_settings_that_cannot_work_stop_the_role_at_start_naming_the_setting() {
        let cases = [
            ("PIXMESH__WORKER__TLS__CLIENT_AUTH", "required", "worker.tls"),
            ("PIXMESH__REGISTRY__TLS__CERT", "/x.pem", "registry.tls.cert and registry.tls.key go together"),
            ("PIXMESH__UPLOAD__TLS__CLIENT_CA", "/ca.pem", "upload.tls.client_ca"),
            ("PIXMESH__STATUS__TLS__KEY", "/k.pem", "status.tls.cert and status.tls.key go together"),
            ("PIXMESH__DISTRIBUTOR__CLIENT_TLS__CERT", "/c.pem", "distributor.client_tls.cert and distributor.client_tls.key go together"),
            ("PIXMESH__WORKER__CLIENT_TLS__KEY", "/k.pem", "worker.client_tls.cert and worker.client_tls.key go together"),
            ("PIXMESH__GATEWAY__CLIENT_TLS__CERT", "/c.pem", "gateway.client_tls.cert and gateway.client_tls.key go together"),
        ];
        // A gRPC caller with a certificate but no CA would dial in plaintext: refused.
        for role in ["DISTRIBUTOR", "WORKER"] {
            let env = [
                (format!("PIXMESH__{role}__CLIENT_TLS__CERT"), "/c.pem".to_string()),
                (format!("PIXMESH__{role}__CLIENT_TLS__KEY"), "/k.pem".to_string()),
            ]
            .into_iter()
            .collect();
            let err = pixmesh_chassis::config::load::<Config>(None, &env, &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("{}.client_tls.cert needs", role.to_lowercase())), "{err}");
        }
        for (var, value, expected) in cases {
            let env = [(var.to_string(), value.to_string())].into_iter().collect();
            let err = pixmesh_chassis::config::load::<Config>(None, &env, &[]).unwrap_err();
            assert!(err.to_string().contains(expected), "{var}: {err}");
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pixmesh.example.toml");
        let config: Config = pixmesh_chassis::config::load(Some(&path), &HashMap::new(), &[]).unwrap();
        assert_eq!(config, Config::default(), "the example documents the defaults");
    }
}
