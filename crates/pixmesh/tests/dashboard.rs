//! The Grafana dashboard in `deploy/grafana` reads only metrics the roles define (their
//! `instruments` modules), so a renamed metric cannot leave a panel silently empty.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;

fn defined() -> BTreeSet<&'static str> {
    [
        pixmesh_chassis::instruments::NAMES,
        pixmesh_gateway::instruments::NAMES,
        pixmesh_upload::instruments::NAMES,
        pixmesh_status::instruments::NAMES,
        pixmesh_distributor::instruments::NAMES,
        pixmesh_worker::instruments::NAMES,
        pixmesh_registry::instruments::NAMES,
        pixmesh_store::instruments::NAMES,
        pixmesh_queue::instruments::NAMES,
    ]
    .concat()
    .into_iter()
    .collect()
}

/// The metric names in a PromQL expression: the identifiers with a metric's prefix (label
/// names such as `http_route` or `rpc_method` have none of these), a histogram's series
/// suffixes taken off.
fn metrics_in(expr: &str) -> Vec<String> {
    const PREFIXES: [&str; 5] = ["pixmesh_", "http_server_", "http_client_", "rpc_client_", "rpc_server_"];
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| PREFIXES.iter().any(|p| t.starts_with(p)))
        .map(|t| {
            let t = ["_bucket", "_sum", "_count"].iter().find_map(|s| t.strip_suffix(s)).unwrap_or(t);
            t.to_string()
        })
        .collect()
}

#[test]
fn every_panel_reads_metrics_the_roles_define() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana/pixmesh.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let defined = defined();
    let mut used = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", panel["title"]));
        assert!(!targets.is_empty(), "panel {} has no queries", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let names = metrics_in(expr);
            assert!(!names.is_empty(), "panel {}: no metric in {expr}", panel["title"]);
            for name in names {
                assert!(defined.contains(name.as_str()), "panel {}: `{name}` is not a metric any role defines", panel["title"]);
                used.insert(name);
            }
        }
    }
    // The ones the dashboard exists for.
    for needed in
        ["pixmesh_jobs_total", "pixmesh_queue_depth", "pixmesh_queue_oldest_job_age_seconds", "pixmesh_distributor_worker_breaker_state"]
    {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
}

#[test]
fn metric_names_follow_the_conventions() {
    for name in defined() {
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{name}: snake_case");
        let otel = ["http_server_", "http_client_", "rpc_client_", "rpc_server_"].iter().any(|p| name.starts_with(p));
        assert!(otel || name.starts_with("pixmesh_"), "{name}: an OpenTelemetry name or pixmesh_*");
        assert!(!name.ends_with("_ms") && !name.contains("_millis"), "{name}: base units (seconds)");
    }
    assert_eq!(
        metrics_in("histogram_quantile(0.95, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket[5m])))"),
        ["http_server_request_duration_seconds"]
    );
}
