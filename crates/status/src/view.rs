//! The status view, folded from job events.

use pixmesh_chassis::time::rfc3339_ms;
use pixmesh_store::{EventKind, JobEvent};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusView {
    pub id: String,
    /// `queued`, `processing`, `succeeded` or `failed`.
    pub state: &'static str,
    /// How many times a distributor claimed the job.
    pub attempts: u32,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultView {
    pub width: u64,
    pub height: u64,
    pub format: String,
    pub bytes: u64,
}

fn text(v: &serde_json::Value, key: &str) -> String {
    v.get(key).and_then(|x| x.as_str()).unwrap_or_default().to_string()
}

/// Folds a job's events (in order) into its status; `None` when there are none.
pub fn fold(events: &[JobEvent]) -> Option<StatusView> {
    let first = events.first()?;
    let mut view = StatusView {
        id: first.job_id.clone(),
        state: "queued",
        attempts: 0,
        created_at: rfc3339_ms(first.at),
        updated_at: rfc3339_ms(first.at),
        error: None,
        result: None,
    };
    for event in events {
        view.updated_at = rfc3339_ms(event.at);
        view.attempts = view.attempts.max(event.attempt);
        match event.kind {
            EventKind::Accepted => view.state = "queued",
            EventKind::Claimed | EventKind::Retried => view.state = "processing",
            EventKind::LeaseExpired | EventKind::Released => view.state = "queued",
            EventKind::Succeeded => {
                view.state = "succeeded";
                view.error = None;
                let d = &event.data;
                view.result = Some(ResultView {
                    width: d.get("width").and_then(|x| x.as_u64()).unwrap_or(0),
                    height: d.get("height").and_then(|x| x.as_u64()).unwrap_or(0),
                    format: text(d, "format"),
                    bytes: d.pointer("/blob/size").and_then(|x| x.as_u64()).unwrap_or(0),
                });
            }
            EventKind::Failed => {
                view.state = "failed";
                view.error = Some(ErrorView { code: text(&event.data, "code"), message: text(&event.data, "message") });
            }
        }
    }
    Some(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: EventKind, attempt: u32, at: i64, data: serde_json::Value) -> JobEvent {
        JobEvent { seq: at, job_id: "j".into(), kind, attempt, at, data }
    }

    #[test]
    fn folds_histories() {
        assert_eq!(fold(&[]), None);
        let accepted = ev(EventKind::Accepted, 0, 1000, json!({}));
        let v = fold(std::slice::from_ref(&accepted)).unwrap();
        assert_eq!((v.state, v.attempts, v.created_at.as_str()), ("queued", 0, "1970-01-01T00:00:01.000Z"));

        let history = [
            accepted.clone(),
            ev(EventKind::Claimed, 1, 2000, json!({})),
            ev(EventKind::Retried, 1, 2500, json!({"code": "unavailable"})),
            ev(EventKind::Released, 1, 3000, json!({})),
            ev(EventKind::Claimed, 2, 4000, json!({})),
            ev(
                EventKind::Succeeded,
                2,
                5000,
                json!({"width": 800, "height": 500, "format": "webp", "blob": {"digest": "x", "size": 1234}}),
            ),
        ];
        let v = fold(&history).unwrap();
        assert_eq!((v.state, v.attempts), ("succeeded", 2));
        assert_eq!(v.result, Some(ResultView { width: 800, height: 500, format: "webp".into(), bytes: 1234 }));
        assert_eq!(v.updated_at, "1970-01-01T00:00:05.000Z");
        // Each prefix of the history is a valid view too.
        let states: Vec<_> = (1..=history.len()).map(|n| fold(&history[..n]).unwrap().state).collect();
        assert_eq!(states, vec!["queued", "processing", "processing", "queued", "processing", "succeeded"]);

        let failed = [
            accepted,
            ev(EventKind::Claimed, 1, 2000, json!({})),
            ev(EventKind::Failed, 1, 3000, json!({"code": "corrupt_image", "message": "truncated"})),
        ];
        let v = fold(&failed).unwrap();
        assert_eq!(v.state, "failed");
        assert_eq!(v.error, Some(ErrorView { code: "corrupt_image".into(), message: "truncated".into() }));
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("result").is_none());
    }
}
