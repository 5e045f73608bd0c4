//! Every metric the ambassadors record: name, kind, unit and help, in one place (the
//! conventions are those of the other roles' `instruments`).

use metrics::Unit;

/// Commands sent to each shard (a split command counts once per shard it reached).
pub const COMMANDS: &str = "pixmesh_ambassador_redis_commands_total";
/// Failures of each shard: refused connections, resets, replies that did not come in time.
pub const SHARD_ERRORS: &str = "pixmesh_ambassador_redis_shard_errors_total";
/// Shards taken out of the ring after failing `eject_after` times in a row.
pub const EJECTIONS: &str = "pixmesh_ambassador_redis_ejections_total";
/// Shards out of the ring now.
pub const SHARDS_EJECTED: &str = "pixmesh_ambassador_redis_shards_ejected";
/// Client connections open now.
pub const CLIENTS: &str = "pixmesh_ambassador_redis_client_connections";
/// Client connections refused at `max_clients`.
pub const CLIENTS_REFUSED: &str = "pixmesh_ambassador_redis_client_connections_refused_total";

/// Every name above.
pub const NAMES: &[&str] = &[COMMANDS, SHARD_ERRORS, EJECTIONS, SHARDS_EJECTED, CLIENTS, CLIENTS_REFUSED];

/// Gives each metric its help text and unit.
pub fn describe() {
    metrics::describe_counter!(COMMANDS, Unit::Count, "Commands sent to each shard (a split command counts once per shard it reached)");
    metrics::describe_counter!(
        SHARD_ERRORS,
        Unit::Count,
        "Failures of each shard: refused connections, resets, replies that did not come in time"
    );
    metrics::describe_counter!(EJECTIONS, Unit::Count, "Shards taken out of the ring after failing eject_after times in a row");
    metrics::describe_gauge!(SHARDS_EJECTED, Unit::Count, "Shards out of the ring now");
    metrics::describe_gauge!(CLIENTS, Unit::Count, "Client connections open now");
    metrics::describe_counter!(CLIENTS_REFUSED, Unit::Count, "Client connections refused at max_clients");
}
