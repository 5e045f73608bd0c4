//! The status view: a job's history, folded by the model's one `fold`, as the API shows it.

use pixmesh_chassis::time::rfc3339_ms;
use pixmesh_store::{JobEvent, JobResult, JobState, JobView};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StatusView {
    pub id: String,
    /// `queued`, `processing`, `succeeded` or `failed`.
    #[schema(value_type = String, pattern = "^(queued|processing|succeeded|failed)$")]
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
    /// A job with named outputs: each output, in the order asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputView>,
    /// Set while a job with named outputs turns back: the outputs it made are being deleted,
    /// after which it fails with this error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensating: Option<ErrorView>,
    /// The result cache served this job: the id of the identical upload (the same image bytes
    /// and options) whose work it has, or is waiting for. No worker made anything for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
}

/// One named output of a job.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct OutputView {
    pub name: String,
    /// `pending` (not made yet), `made` (made; the job succeeds once every output is),
    /// `succeeded`, `failed` (the output whose failure failed the job), or `abandoned` (the job
    /// turned back: this output is not made, or what was made is deleted).
    #[schema(value_type = String)]
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultView>,
    /// Where to download it once the job has succeeded (signed as `result_url` is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ResultView {
    pub width: u64,
    pub height: u64,
    pub format: String,
    pub bytes: u64,
}

impl From<&JobResult> for ResultView {
    fn from(r: &JobResult) -> Self {
        ResultView { width: u64::from(r.width), height: u64::from(r.height), format: r.format.clone(), bytes: r.blob.size }
    }
}

impl From<JobView> for StatusView {
    fn from(view: JobView) -> Self {
        let turned_back = view.compensating.is_some() || view.state == JobState::Failed;
        let outputs = view
            .requested
            .iter()
            .map(|name| {
                let made = view.outputs.get(name);
                let state = match (view.state, made) {
                    (JobState::Succeeded, Some(_)) => "succeeded",
                    _ if view.failed_output.as_deref() == Some(name) => "failed",
                    _ if turned_back => "abandoned",
                    (_, Some(_)) => "made",
                    (_, None) => "pending",
                };
                let result = made.filter(|_| !turned_back).map(ResultView::from);
                OutputView { name: name.clone(), state, result, result_url: None }
            })
            .collect();
        StatusView {
            id: view.id,
            state: view.state.as_str(),
            attempts: view.attempts,
            created_at: rfc3339_ms(view.created_at),
            updated_at: rfc3339_ms(view.updated_at),
            error: view.error.map(|e| ErrorView { code: e.code, message: e.message }),
            result: view.result.as_ref().map(ResultView::from),
            result_url: None,
            outputs,
            compensating: view
                .compensating
                .filter(|_| view.state != JobState::Failed)
                .map(|e| ErrorView { code: e.code, message: e.message }),
            cached_from: view.cached_from,
        }
    }
}

/// One event of a job's history, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventView {
    /// The job the event is of (what tells the events of `/api/events` apart).
    pub job_id: String,
    /// 1 for the first event of the job, then one more for each: the order of the history.
    pub seq: u32,
    /// `accepted`, `claimed`, `lease_expired`, `retried`, `released`, `succeeded`, `failed`,
    /// `output_succeeded`, `compensating`, `output_deleted` or `cached`.
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The claim it belongs to (0 before the first).
    pub attempt: u32,
    /// The wall-clock part of `hlc`, RFC 3339.
    pub at: String,
    /// Its hybrid-logical-clock time (a decimal u64): above the time of the event before it.
    pub hlc: String,
    /// The event's fields (`{"owner": …}` for `claimed`, the error for `failed`, …).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl From<&JobEvent> for EventView {
    fn from(event: &JobEvent) -> Self {
        EventView {
            job_id: event.job_id.clone(),
            seq: event.seq,
            kind: event.kind().as_str(),
            attempt: event.attempt,
            at: rfc3339_ms(event.at),
            hlc: event.hlc.to_string(),
            data: event.data(),
        }
    }
}

/// One server-sent event of an event stream, as the stream carries it (the shape OpenAPI 3.2
/// gives `text/event-stream` items): `data` is an [`EventView`], as JSON. For the documentation
/// only: the streams write the fields themselves.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StreamEvent {
    /// The job's `seq` of the event (`/api/status/{id}/events`), or its place in the log of
    /// all events (`/api/events`): what `Last-Event-ID` takes.
    pub id: String,
    /// The event's kind.
    pub event: String,
    /// The event as in the history: an `EventView`, as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// A page of the caller's jobs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobsPage {
    pub jobs: Vec<StatusView>,
    /// The `cursor` of the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// A job's whole history.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
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
            Event::Accepted { input: BlobRef::at_digest("d", 1), input_format: "png".into(), options: Options::default(), outputs: vec![] },
        );
        let v = fold(std::slice::from_ref(&accepted)).unwrap();
        assert_eq!((v.state, v.attempts, v.created_at.as_str()), ("queued", 0, "1970-01-01T00:00:01.000Z"));

        let result = JobResult {
            blob: BlobRef::at_digest("x", 1234),
            format: "webp".into(),
            content_type: "image/webp".into(),
            width: 800,
            height: 500,
        };
        let done = [
            accepted.clone(),
            ev(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }),
            ev(3, 1, Event::Succeeded { result: Some(result), outputs: Default::default() }),
        ];
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
        assert!(json.get("outputs").is_none(), "a job with one unnamed output lists none");
    }

    #[test]
    fn lists_every_named_output_through_a_saga_that_succeeds_and_one_that_turns_back() {
        let outputs = ["thumb", "large", "webp"].map(|n| pixmesh_store::Output { name: n.into(), options: Options::default() }).to_vec();
        let accepted = ev(
            1,
            0,
            Event::Accepted { input: BlobRef::at_digest("d", 1), input_format: "png".into(), options: Options::default(), outputs },
        );
        let made = |name: &str, size: u64| JobResult {
            blob: BlobRef { key: Some(format!("j/{name}/1")), ..BlobRef::at_digest("x", size) },
            format: "png".into(),
            content_type: "image/png".into(),
            width: 10,
            height: 10,
        };
        let claimed = ev(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 });
        let thumb = ev(3, 1, Event::OutputSucceeded { output: "thumb".into(), result: made("thumb", 5) });
        let states = |v: &StatusView| v.outputs.iter().map(|o| (o.name.clone(), o.state)).collect::<Vec<_>>();
        let v = fold(&[accepted.clone(), claimed.clone(), thumb.clone()]).unwrap();
        assert_eq!(
            states(&v),
            [("thumb", "made"), ("large", "pending"), ("webp", "pending")].map(|(n, s): (&str, &str)| (n.to_string(), s)).to_vec()
        );
        assert_eq!(v.outputs[0].result.as_ref().map(|r| r.bytes), Some(5));

        let all = std::collections::BTreeMap::from(["thumb", "large", "webp"].map(|n| (n.to_string(), made(n, 7))));
        let v =
            fold(&[accepted.clone(), claimed.clone(), thumb.clone(), ev(4, 1, Event::Succeeded { result: None, outputs: all })]).unwrap();
        assert_eq!(
            states(&v),
            [("thumb", "succeeded"), ("large", "succeeded"), ("webp", "succeeded")].map(|(n, s): (&str, &str)| (n.to_string(), s)).to_vec()
        );
        assert_eq!((v.state, v.result.clone()), ("succeeded", None));

        let error = JobError { code: "bad_request".into(), message: "no".into() };
        let turning = [accepted, claimed, thumb, ev(4, 1, Event::Compensating { output: Some("large".into()), error: error.clone() })];
        let v = fold(&turning).unwrap();
        assert_eq!(
            states(&v),
            [("thumb", "abandoned"), ("large", "failed"), ("webp", "abandoned")].map(|(n, s): (&str, &str)| (n.to_string(), s)).to_vec()
        );
        assert_eq!((v.state, v.compensating.as_ref().map(|e| e.code.as_str())), ("processing", Some("bad_request")));
        assert!(v.outputs[0].result.is_none(), "a made output that is being deleted shows no result");
        let mut ended = turning.to_vec();
        ended.push(ev(5, 1, Event::OutputDeleted { output: "thumb".into(), key: "j/thumb/1".into() }));
        ended.push(ev(6, 1, Event::Failed { error }));
        let v = fold(&ended).unwrap();
        assert_eq!((v.state, v.compensating.clone(), v.error.as_ref().map(|e| e.code.as_str())), ("failed", None, Some("bad_request")));
        assert_eq!(
            states(&v),
            [("thumb", "abandoned"), ("large", "failed"), ("webp", "abandoned")].map(|(n, s): (&str, &str)| (n.to_string(), s)).to_vec()
        );
    }
}
