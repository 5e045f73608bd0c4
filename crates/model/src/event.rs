//! A job's history: one typed, versioned event per state change, and the one function that
//! folds a history into the job's state.
//!
//! Each event is written in the same transaction as the change it describes, numbered per job
//! (`seq` 1, 2, 3, … without gaps), so a history is never ahead of or behind the job row, and a
//! reader can tell a complete history from a partial one.
//!
//! Stored as three columns: `kind` (the variant's name), `version` ([`EVENT_VERSION`] when it
//! was written) and `data` (the variant's fields as a JSON object). A change that a reader of
//! an older version could misread (a field renamed or given a new meaning) raises
//! [`EVENT_VERSION`], and [`Event::decode`] keeps reading every older version.

use crate::blob::BlobRef;
use crate::hlc::Hlc;
use crate::job::{JobError, JobResult, JobState, Output};
use crate::options::Options;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of the event encoding this build writes. Version 1 is the shape the event log
/// has had since its first release (fields flat in `data`), so every stored history reads.
pub const EVENT_VERSION: u16 = 1;

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The upload service recorded the job.
    Accepted {
        input: BlobRef,
        input_format: String,
        options: Options,
        /// The named outputs of a saga (absent for one unnamed output).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outputs: Vec<Output>,
    },
    /// A distributor claimed the job under a lease; the event's `attempt` is the new fencing
    /// token.
    Claimed { owner: String, lease_expires_at: i64 },
    /// A claim's lease ran out before it finished; the job is claimable again.
    LeaseExpired { owner: Option<String> },
    /// A worker call failed with a retryable error; the distributor tries another worker.
    Retried {
        worker: String,
        #[serde(flatten)]
        error: JobError,
    },
    /// The distributor gave the job back to the queue, claimable again at `not_before`.
    Released {
        #[serde(flatten)]
        error: JobError,
        not_before: i64,
    },
    /// The job's end: its one result, or (a saga's pivot) every named output at once.
    Succeeded {
        #[serde(flatten)]
        result: Option<JobResult>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        outputs: BTreeMap<String, JobResult>,
    },
    Failed {
        #[serde(flatten)]
        error: JobError,
    },
    /// One step of a saga wrote its output (at the key in `blob`); it is kept across claims
    /// until the pivot or a compensation.
    OutputSucceeded {
        output: String,
        #[serde(flatten)]
        result: JobResult,
    },
    /// The saga turned back: `output` failed for good (or, without `output`, the job used up
    /// its attempts). The outputs written are deleted, then the job fails with this error.
    Compensating {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        #[serde(flatten)]
        error: JobError,
    },
    /// A compensation deleted an output that a step had written.
    OutputDeleted { output: String, key: String },
    /// The result cache gave the job the work of job `from`, an identical upload (the same
    /// input bytes and options): already made (the job succeeds at once with its result), or
    /// being made (the job waits and ends with it; if `from` fails, the job is released and
    /// made on its own).
    Cached { from: String },
}

/// The name of an event, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Accepted,
    Claimed,
    LeaseExpired,
    Retried,
    Released,
    Succeeded,
    Failed,
    OutputSucceeded,
    Compensating,
    OutputDeleted,
    Cached,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::Accepted,
        EventKind::Claimed,
        EventKind::LeaseExpired,
        EventKind::Retried,
        EventKind::Released,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::OutputSucceeded,
        EventKind::Compensating,
        EventKind::OutputDeleted,
        EventKind::Cached,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Claimed => "claimed",
            EventKind::LeaseExpired => "lease_expired",
            EventKind::Retried => "retried",
            EventKind::Released => "released",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::OutputSucceeded => "output_succeeded",
            EventKind::Compensating => "compensating",
            EventKind::OutputDeleted => "output_deleted",
            EventKind::Cached => "cached",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Accepted { .. } => EventKind::Accepted,
            Event::Claimed { .. } => EventKind::Claimed,
            Event::LeaseExpired { .. } => EventKind::LeaseExpired,
            Event::Retried { .. } => EventKind::Retried,
            Event::Released { .. } => EventKind::Released,
            Event::Succeeded { .. } => EventKind::Succeeded,
            Event::Failed { .. } => EventKind::Failed,
            Event::OutputSucceeded { .. } => EventKind::OutputSucceeded,
            Event::Compensating { .. } => EventKind::Compensating,
            Event::OutputDeleted { .. } => EventKind::OutputDeleted,
            Event::Cached { .. } => EventKind::Cached,
        }
    }

    /// The stored form: the kind, and the fields as a JSON object (without the kind).
    pub fn encode(&self) -> Result<(EventKind, String), String> {
        let mut value = serde_json::to_value(self).map_err(|e| format!("cannot encode a {} event: {e}", self.kind().as_str()))?;
        if let Some(fields) = value.as_object_mut() {
            fields.remove("kind");
        }
        Ok((self.kind(), value.to_string()))
    }

    /// Reads a stored event of any version this build knows.
    pub fn decode(kind: &str, version: i64, data: &str) -> Result<Event, String> {
        if version < 1 || version > i64::from(EVENT_VERSION) {
            return Err(format!(
                "a {kind} event of version {version}: this pixmesh reads versions 1 to {EVENT_VERSION} (written by a newer pixmesh?)"
            ));
        }
        let kind = EventKind::parse(kind).ok_or_else(|| format!("unknown event kind {kind:?}"))?;
        let mut value: serde_json::Value = serde_json::from_str(data).map_err(|e| format!("{} event data: {e}", kind.as_str()))?;
        let fields = value.as_object_mut().ok_or_else(|| format!("{} event data is not an object", kind.as_str()))?;
        fields.insert("kind".into(), serde_json::Value::from(kind.as_str()));
        serde_json::from_value(value).map_err(|e| format!("{} event data: {e}", kind.as_str()))
    }
}

/// One entry of a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: String,
    /// 1 for the first event of the job, then one more for each.
    pub seq: u32,
    /// The claim this event belongs to (0 before the first claim).
    pub attempt: u32,
    /// Milliseconds since the Unix epoch: the wall-clock part of `hlc`.
    pub at: i64,
    /// When it happened, on the hybrid logical clock of the process that wrote it: never lower
    /// than the time of the event before it (see [`crate::hlc`]), unless that one came from a
    /// process whose clock was beyond the maximum offset. (Absent from events published before
    /// events carried it: read as [`Hlc::MIN`].)
    #[serde(default)]
    pub hlc: Hlc,
    pub event: Event,
}

impl JobEvent {
    pub fn kind(&self) -> EventKind {
        self.event.kind()
    }

    /// The event's fields as a JSON object, as stored (`{"worker": …, "code": …}` for
    /// `retried`), for readers that look at one field without matching every variant.
    pub fn data(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.event).unwrap_or_default();
        if let Some(fields) = value.as_object_mut() {
            fields.remove("kind");
        }
        value
    }
}

/// A job's state as its history tells it. Stored as JSON by the status service's projection
/// (`job_views`), so new fields need `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    /// The highest claim seen.
    pub attempts: u32,
    pub created_at: i64,
    pub updated_at: i64,
    /// Set once the job succeeded.
    pub result: Option<JobResult>,
    /// Set once the job failed.
    pub error: Option<JobError>,
    /// The names of the outputs a saga asked for (empty for one unnamed output).
    pub requested: Vec<String>,
    /// A saga's outputs written and not deleted: its results once it has succeeded.
    pub outputs: BTreeMap<String, JobResult>,
    /// Why a saga is turning back (deleting what it wrote before it fails).
    pub compensating: Option<JobError>,
    /// The output whose failure turned the saga back (none when it used up its attempts).
    pub failed_output: Option<String>,
    /// The job whose work this one reuses (the result cache): set while it waits for it and
    /// once it has its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
    /// The last `seq` folded in.
    pub seq: u32,
}

/// Folds a job's history, in `seq` order, into its state: the one place a state is derived
/// from events. `None` for an empty history.
pub fn fold(events: &[JobEvent]) -> Option<JobView> {
    let first = events.first()?;
    let mut view = JobView {
        id: first.job_id.clone(),
        state: JobState::Queued,
        attempts: 0,
        created_at: first.at,
        updated_at: first.at,
        result: None,
        error: None,
        requested: Vec::new(),
        outputs: BTreeMap::new(),
        compensating: None,
        failed_output: None,
        cached_from: None,
        seq: 0,
    };
    for event in events {
        apply(&mut view, event);
    }
    Some(view)
}

/// Applies one more event to a view (for a reader that follows a history as it grows).
pub fn apply(view: &mut JobView, event: &JobEvent) {
    view.updated_at = event.at;
    view.attempts = view.attempts.max(event.attempt);
    view.seq = event.seq;
    match &event.event {
        Event::Accepted { outputs, .. } => {
            view.state = JobState::Queued;
            view.requested = outputs.iter().map(|o| o.name.clone()).collect();
        }
        Event::LeaseExpired { .. } => view.state = JobState::Queued,
        Event::Released { .. } => {
            view.state = JobState::Queued;
            // A job released from waiting on an identical one is made on its own.
            view.cached_from = None;
        }
        Event::Cached { from } => view.cached_from = Some(from.clone()),
        Event::Claimed { .. } | Event::Retried { .. } => view.state = JobState::Processing,
        Event::OutputSucceeded { output, result } => {
            view.outputs.insert(output.clone(), result.clone());
        }
        Event::Compensating { error, output } => {
            // The first reason is the one the saga fails with (the store keeps the first too).
            if view.compensating.is_none() {
                view.compensating = Some(error.clone());
                view.failed_output = output.clone();
            }
        }
        Event::OutputDeleted { output, .. } => {
            view.outputs.remove(output);
        }
        Event::Succeeded { result, outputs } => {
            view.state = JobState::Succeeded;
            view.error = None;
            view.result = result.clone();
            if !outputs.is_empty() {
                view.outputs = outputs.clone();
            }
        }
        Event::Failed { error } => {
            view.state = JobState::Failed;
            view.error = Some(error.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(code: &str) -> JobError {
        JobError { code: code.into(), message: format!("{code} happened") }
    }

    fn result() -> JobResult {
        JobResult {
            blob: BlobRef::at_digest("b".repeat(64), 1234),
            format: "webp".into(),
            content_type: "image/webp".into(),
            width: 800,
            height: 500,
        }
    }

    fn every_event() -> Vec<Event> {
        vec![
            Event::Accepted {
                input: BlobRef::at_digest("a".repeat(64), 10),
                input_format: "jpeg".into(),
                options: Options { width: Some(100), ..Options::default() },
                outputs: vec![],
            },
            Event::Accepted {
                input: BlobRef::at_digest("a".repeat(64), 10),
                input_format: "jpeg".into(),
                options: Options::default(),
                outputs: vec![Output { name: "thumb".into(), options: Options { width: Some(100), ..Options::default() } }],
            },
            Event::Claimed { owner: "d1".into(), lease_expires_at: 5 },
            Event::LeaseExpired { owner: Some("d1".into()) },
            Event::LeaseExpired { owner: None },
            Event::Retried { worker: "w1".into(), error: error("unavailable") },
            Event::Released { error: error("unavailable"), not_before: 9 },
            Event::Succeeded { result: Some(result()), outputs: BTreeMap::new() },
            Event::Succeeded {
                result: None,
                outputs: BTreeMap::from([("thumb".into(), keyed("thumb")), ("large".into(), keyed("large"))]),
            },
            Event::Failed { error: error("corrupt_image") },
            Event::OutputSucceeded { output: "thumb".into(), result: keyed("thumb") },
            Event::Compensating { output: Some("large".into()), error: error("bad_request") },
            Event::Compensating { output: None, error: error("unavailable") },
            Event::OutputDeleted { output: "thumb".into(), key: "j/thumb/1".into() },
            Event::Cached { from: "j0".into() },
        ]
    }

    fn keyed(output: &str) -> JobResult {
        let mut r = result();
        r.blob.key = Some(crate::blob::output_key("j", output, 1));
        r
    }

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        for event in every_event() {
            let (kind, data) = event.encode().unwrap();
            assert_eq!(kind, event.kind());
            assert!(!data.contains("\"kind\""), "the kind is its own column: {data}");
            assert_eq!(Event::decode(kind.as_str(), 1, &data).unwrap(), event);
        }
    }

    #[test]
    fn version_1_rows_written_before_the_typed_enum_still_read() {
        // Exactly what the event log held before events were typed (flat fields in `data`).
        let old = [
            ("accepted", json!({"input": {"digest": "d", "size": 1}, "input_format": "png", "options": {}})),
            ("claimed", json!({"owner": "d1", "lease_expires_at": 7})),
            ("lease_expired", json!({"owner": null})),
            ("retried", json!({"worker": "w", "code": "unavailable", "message": "m"})),
            ("released", json!({"code": "unavailable", "message": "m", "not_before": 3})),
            (
                "succeeded",
                json!({"blob": {"digest": "r", "size": 2}, "format": "png", "content_type": "image/png", "width": 1, "height": 2}),
            ),
            ("failed", json!({"code": "corrupt_image", "message": "truncated"})),
        ];
        for (kind, data) in old {
            let event = Event::decode(kind, 1, &data.to_string()).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(event.kind().as_str(), kind);
        }
    }

    #[test]
    fn unknown_versions_kinds_and_shapes_are_refused_with_a_reason() {
        let err = Event::decode("claimed", 2, r#"{"owner":"d","lease_expires_at":1}"#).unwrap_err();
        assert!(err.contains("version 2") && err.contains("newer pixmesh"), "{err}");
        assert!(Event::decode("claimed", 0, "{}").is_err());
        assert!(Event::decode("exploded", 1, "{}").unwrap_err().contains("unknown event kind"));
        assert!(Event::decode("claimed", 1, "[]").unwrap_err().contains("not an object"));
        assert!(Event::decode("claimed", 1, r#"{"owner": 5}"#).is_err());
        assert!(Event::decode("claimed", 1, "{").is_err());
    }

    fn at(seq: u32, attempt: u32, event: Event) -> JobEvent {
        let at = i64::from(seq) * 1000;
        JobEvent { job_id: "j".into(), seq, attempt, at, hlc: Hlc::from_unix_ms(at), event }
    }

    #[test]
    fn a_single_result_and_a_saga_pivot_read_back_as_what_they_are() {
        // The stored form of a single result is unchanged: its fields, flat.
        let (_, data) = Event::Succeeded { result: Some(result()), outputs: BTreeMap::new() }.encode().unwrap();
        assert!(!data.contains("outputs"), "{data}");
        assert_eq!(Event::decode("succeeded", 1, &data).unwrap(), Event::Succeeded { result: Some(result()), outputs: BTreeMap::new() });
        let pivot = Event::Succeeded { result: None, outputs: BTreeMap::from([("thumb".into(), keyed("thumb"))]) };
        let (_, data) = pivot.encode().unwrap();
        assert!(!data.contains("\"format\":\"webp\",\"outputs"), "no flat result: {data}");
        assert_eq!(Event::decode("succeeded", 1, &data).unwrap(), pivot);
    }

    #[test]
    fn folds_a_saga_that_writes_outputs_and_one_that_compensates() {
        let accepted = at(
            1,
            0,
            Event::Accepted {
                input: BlobRef::at_digest("a".repeat(64), 10),
                input_format: "jpeg".into(),
                options: Options::default(),
                outputs: ["thumb", "large"].map(|n| Output { name: n.into(), options: Options::default() }).to_vec(),
            },
        );
        let claimed = at(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 });
        let thumb = at(3, 1, Event::OutputSucceeded { output: "thumb".into(), result: keyed("thumb") });
        let v = fold(&[accepted.clone(), claimed.clone(), thumb.clone()]).unwrap();
        assert_eq!(v.requested, vec!["thumb".to_string(), "large".to_string()]);
        assert_eq!((v.state, v.outputs.len(), v.result.clone()), (JobState::Processing, 1, None));
        let both = BTreeMap::from([("thumb".into(), keyed("thumb")), ("large".into(), keyed("large"))]);
        let done = fold(&[
            accepted.clone(),
            claimed.clone(),
            thumb.clone(),
            at(4, 1, Event::OutputSucceeded { output: "large".into(), result: keyed("large") }),
            at(5, 1, Event::Succeeded { result: None, outputs: both.clone() }),
        ])
        .unwrap();
        assert_eq!((done.state, done.outputs), (JobState::Succeeded, both));
        let undone = fold(&[
            accepted,
            claimed,
            thumb,
            at(4, 1, Event::Compensating { output: Some("large".into()), error: error("bad_request") }),
            at(5, 1, Event::OutputDeleted { output: "thumb".into(), key: "j/thumb/1".into() }),
            at(6, 1, Event::Failed { error: error("bad_request") }),
        ])
        .unwrap();
        assert_eq!((undone.state, undone.outputs.len()), (JobState::Failed, 0));
        assert_eq!(undone.compensating, Some(error("bad_request")));
    }

    #[test]
    fn folds_histories() {
        assert_eq!(fold(&[]), None);
        let accepted = at(1, 0, every_event().remove(0));
        let v = fold(std::slice::from_ref(&accepted)).unwrap();
        assert_eq!((v.state, v.attempts, v.created_at, v.seq), (JobState::Queued, 0, 1000, 1));

        let history = [
            accepted.clone(),
            at(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }),
            at(3, 1, Event::Retried { worker: "w".into(), error: error("unavailable") }),
            at(4, 1, Event::Released { error: error("unavailable"), not_before: 0 }),
            at(5, 2, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }),
            at(6, 2, Event::Succeeded { result: Some(result()), outputs: BTreeMap::new() }),
        ];
        let v = fold(&history).unwrap();
        assert_eq!((v.state, v.attempts, v.updated_at, v.seq), (JobState::Succeeded, 2, 6000, 6));
        assert_eq!(v.result, Some(result()));
        // Each prefix of the history is a valid view too.
        let states: Vec<_> = (1..=history.len()).map(|n| fold(&history[..n]).unwrap().state).collect();
        use JobState::*;
        assert_eq!(states, vec![Queued, Processing, Processing, Queued, Processing, Succeeded]);

        let failed = [
            accepted,
            at(2, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }),
            at(3, 1, Event::LeaseExpired { owner: Some("d".into()) }),
            at(4, 2, Event::Failed { error: error("corrupt_image") }),
        ];
        let v = fold(&failed).unwrap();
        assert_eq!((v.state, v.attempts), (Failed, 2));
        assert_eq!(v.error, Some(error("corrupt_image")));
        assert_eq!(v.result, None);
    }

    #[test]
    fn a_job_the_cache_served_says_whose_work_it_has_until_it_is_made_on_its_own() {
        let accepted = at(1, 0, every_event().remove(0));
        let hit = fold(&[
            accepted.clone(),
            at(2, 0, Event::Cached { from: "j0".into() }),
            at(3, 0, Event::Succeeded { result: Some(result()), outputs: BTreeMap::new() }),
        ])
        .unwrap();
        assert_eq!((hit.state, hit.cached_from.as_deref(), hit.attempts), (JobState::Succeeded, Some("j0"), 0));
        // It waited for j0, which failed: released, it is made on its own.
        let released = fold(&[
            accepted.clone(),
            at(2, 0, Event::Cached { from: "j0".into() }),
            at(3, 0, Event::Released { error: error("corrupt_image"), not_before: 0 }),
            at(4, 1, Event::Claimed { owner: "d".into(), lease_expires_at: 0 }),
        ])
        .unwrap();
        assert_eq!((released.state, released.cached_from), (JobState::Processing, None));
        // A view stored before the field existed still reads.
        let mut stored = serde_json::to_value(&hit).unwrap();
        stored.as_object_mut().unwrap().remove("cached_from");
        assert_eq!(serde_json::from_value::<JobView>(stored).unwrap().cached_from, None);
    }
}
