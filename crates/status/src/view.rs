//! The status view: a job's history, folded by the model's one `fold`, as the API shows it.

use pixmesh_chassis::time::rfc3339_ms;
use pixmesh_store::{JobEvent, JobView};
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
    /// Where to download the result, once there is one: a signed URL that works without the
    /// API key for `gateway.signed_urls.ttl_s` when signing keys are configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
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

impl From<JobView> for StatusView {
    fn from(view: JobView) -> Self {
        StatusView {
            id: view.id,
            state: view.state.as_str(),
            attempts: view.attempts,
            created_at: rfc3339_ms(view.created_at),
            updated_at: rfc3339_ms(view.updated_at),
            error: view.error.map(|e| ErrorView { code: e.code, message: e.message }),
            result: view.result.map(|r| ResultView {
                width: u64::from(r.width),
                height: u64::from(r.height),
                format: r.format,
                bytes: r.blob.size,
            }),
            result_url: None,
        }
    }
}

/// One event of a job's history, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    /// 1 for the first event of the job, then one more for each: the order of the history.
    pub seq: u32,
    /// `accepted`, `claimed`, `lease_expired`, `retried`, `released`, `succeeded` or `failed`.
    pub kind: &'static str,
    /// The claim it belongs to (0 before the first).
    pub attempt: u32,
    /// The wall-clock part of `hlc`, RFC 3339.
    pub at: String,
    /// Its hybrid-logical-clock time (a decimal u64): above the time of the event before it.
    pub hlc: String,
    /// The event's fields (`{"owner": …}` for `claimed`, the error for `failed`, …).
    pub data: serde_json::Value,
}

impl From<&JobEvent> for EventView {
    fn from(event: &JobEvent) -> Self {
        EventView {
            seq: event.seq,
            kind: event.kind().as_str(),
            attempt: event.attempt,
            at: rfc3339_ms(event.at),
            hlc: event.hlc.to_string(),
            data: event.data(),
        }
    }
}

/// A job's whole history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    pub id: String,
    pub events: Vec<EventView>,
}

/// Folds a job's events (in order) into its status; `None` when there are none.
pub fn fold(events: &[JobEvent]) -> Option<StatusView> {
    pixmesh_store::fold(events).map(StatusView::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_store::{BlobRef, Event, JobError, JobResult, Options};

    fn ev(seq: u32, attempt: u32, event: Event) -> JobEvent {
        let at = i64::from(seq) * 1000;
        JobEvent { job_id: "j".into(), seq, attempt, at, hlc: pixmesh_store::Hlc::from_unix_ms(at), event }
    }

    #[test]
    fn renders_folded_histories() {
        assert_eq!(fold(&[]), None);
        let accepted = ev(
            1,
            0,
            Event::Accepted { input: BlobRef { digest: "d".into(), size: 1 }, input_format: "png".into(), options: Options::default() },
        );
        let v = fold(std::slice::from_ref(&accepted)).unwrap();
        assert_eq!((v.state, v.attempts, v.created_at.as_str()), ("queued", 0, "1970-01-01T00:00:01.000Z"));

        let result = JobResult {
            blob: BlobRef { digest: "x".into(), size: 1234 },
            format: "webp".into(),
            content_type: "image/webp".into(),
            width: 800,
            height: 500,
        };
        let done =
            [accepted.clone(), ev(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }), ev(3, 1, Event::Succeeded { result })];
        let v = fold(&done).unwrap();
        assert_eq!((v.state, v.attempts, v.updated_at.as_str()), ("succeeded", 1, "1970-01-01T00:00:03.000Z"));
        assert_eq!(v.result, Some(ResultView { width: 800, height: 500, format: "webp".into(), bytes: 1234 }));

        let error = JobError { code: "corrupt_image".into(), message: "truncated".into() };
        let failed = [accepted, ev(2, 1, Event::Failed { error })];
        let v = fold(&failed).unwrap();
        assert_eq!(v.state, "failed");
        assert_eq!(v.error, Some(ErrorView { code: "corrupt_image".into(), message: "truncated".into() }));
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("result").is_none());
    }
}
