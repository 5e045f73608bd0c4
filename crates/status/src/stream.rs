//! The SSE streams: `GET /api/status/{id}/events` (one job's events, replayed from the database
//! after `Last-Event-ID`, then live until its terminal event) and `GET /api/events` (every event
//! of the caller's own jobs, live, replayed after `Last-Event-ID` too).
//!
//! Each stream runs as a task that writes into a small queue the response body reads: a
//! client that reads slowly stalls only its own task, whose live events then pile up in its
//! watcher's bounded queue until the hub drops it ([`crate::live`]); the stream then ends with
//! an error, which closes the connection, and the client comes back with `Last-Event-ID`.

use crate::handler::{App, Reader, job_id, readable};
use crate::live::Watch;
use crate::view::EventView;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, header};
use pixmesh_chassis::{ApiError, ErrorBody, ErrorCode, Shutdown};
use pixmesh_store::{EventKind, JobEvent, OutboxEvent};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Events replayed on one connection to `/api/events`; past it the stream ends, and the client
/// reconnects from the last one it got (so a long absence is replayed in pieces, never held
/// whole).
const MAX_REPLAY: usize = 10_000;

/// Why a stream ended before its job did.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the client read too slowly; reconnect with Last-Event-ID")]
    Slow,
    #[error("the job store failed; reconnect with Last-Event-ID")]
    Store,
}

type Frames = mpsc::Sender<Result<Event, Cut>>;

/// `Last-Event-ID`, if the client sent one.
fn last_event_id<T: std::str::FromStr>(headers: &HeaderMap) -> Result<Option<T>, ApiError> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    let text = value.to_str().unwrap_or("").trim();
    text.parse::<T>()
        .map(Some)
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "Last-Event-ID must be the id of an event this stream sent (a number)"))
}

/// A place among the streams this process serves (`status.max_streams`).
fn stream_place(app: &App) -> Result<OwnedSemaphorePermit, ApiError> {
    Arc::clone(&app.streams).try_acquire_owned().map_err(|_| {
        ApiError::new(ErrorCode::Unavailable, "too many event streams are open; retry later, or poll /api/status/{id}").with_retry_after(5)
    })
}

/// The response: what the task writes, with a keep-alive comment after each quiet interval.
fn respond(app: &App, frames: mpsc::Receiver<Result<Event, Cut>>) -> Response {
    let stream = futures_util::stream::unfold(frames, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(app.keep_alive).text("keep-alive")).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Told to proxies that buffer (nginx): this body must go out as it is written.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn frame(id: String, event: &JobEvent) -> Event {
    let data = serde_json::to_string(&EventView::from(event)).unwrap_or_else(|_| "{}".into());
    Event::default().id(id).event(event.kind().as_str()).data(data)
}

fn terminal(event: &JobEvent) -> bool {
    matches!(event.kind(), EventKind::Succeeded | EventKind::Failed)
}

/// `GET /api/status/{id}/events`.
#[utoipa::path(
    get,
    path = "/api/status/{id}/events",
    tag = "jobs",
    operation_id = "job_events",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `seq` of the last event received: the stream goes on after it"),
    ),
    responses(
        (status = 200, description = "Server-sent events: the job's events as they are written (`id:` its seq, `event:` its kind, `data:` the event as in the history), ending after the terminal one; each event's data is an `EventView`", content_type = "text/event-stream", body = crate::view::StreamEvent),
        (status = 400, description = "A bad `Last-Event-ID`", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 503, description = "Too many streams are open, or the job store is down; retry", body = ErrorBody),
    ),
)]
pub async fn job_events(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(path)?;
    readable(&app.stores, &id, &Reader::of(&headers)).await?;
    let last: u32 = last_event_id(&headers)?.unwrap_or(0);
    let place = stream_place(&app)?;
    // Watch first, then replay: an event written in between is in one or the other.
    let watch = app.hub.watch_job(&id);
    let (tx, rx) = mpsc::channel(16);
    let jobs = Arc::clone(&app.stores.jobs);
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let _place = place;
        metrics::gauge!(crate::instruments::STREAMS, "stream" => "job").increment(1.0);
        follow_job(jobs.as_ref(), &id, last, watch, &tx, shutdown).await;
        metrics::gauge!(crate::instruments::STREAMS, "stream" => "job").decrement(1.0);
    });
    Ok(respond(&app, rx))
}

async fn follow_job(jobs: &dyn pixmesh_store::JobStore, id: &str, mut last: u32, mut watch: Watch, tx: &Frames, shutdown: Shutdown) {
    // The history after `last` from the database; again whenever a live event is not the next.
    // A job that has ended and has nothing more for this client ends the stream at once.
    let replay = |last: u32| async move {
        match jobs.events(id).await {
            Ok(events) if events.last().is_some_and(|e| terminal(e) && e.seq <= last) => Ok(None),
            Ok(events) => Ok(Some(events.into_iter().filter(|e| e.seq > last).collect::<Vec<_>>())),
            Err(e) => {
                tracing::warn!(job = id, error = %e, "event stream: cannot read the job's history");
                Err(Cut::Store)
            }
        }
    };
    let mut pending = match replay(last).await {
        Ok(Some(events)) => events,
        Ok(None) => return,
        Err(cut) => return drop(tx.send(Err(cut)).await),
    };
    loop {
        for event in pending.drain(..) {
            if event.seq <= last {
                continue;
            }
            last = event.seq;
            if tx.send(Ok(frame(event.seq.to_string(), &event))).await.is_err() {
                return; // the client went away
            }
            if terminal(&event) {
                return;
            }
        }
        let row = match next(&mut watch, tx, &shutdown).await {
            Some(Some(row)) => row,
            // Dropped by the hub: this client reads too slowly.
            Some(None) => return drop(tx.send(Err(Cut::Slow)).await),
            None => return,
        };
        if row.event.seq <= last {
            continue;
        }
        if row.event.seq == last + 1 {
            pending.push(row.event.clone());
        } else {
            // Something between is not here (it cannot be: the tail reads a job's events in
            // order), so the database says what is.
            pending = match replay(last).await {
                Ok(Some(events)) => events,
                Ok(None) => return,
                Err(cut) => return drop(tx.send(Err(cut)).await),
            };
        }
    }
}

/// The next live event: `Some(None)` when the hub dropped this watcher, `None` when the
/// client went away (the response, and so `tx`'s receiver, was dropped) while waiting, or
/// the process is shutting down.
async fn next(watch: &mut Watch, tx: &Frames, shutdown: &Shutdown) -> Option<Option<Arc<OutboxEvent>>> {
    tokio::select! {
        row = watch.events.recv() => Some(row),
        _ = tx.closed() => None,
        _ = shutdown.wait() => None,
    }
}

/// `GET /api/events`.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "jobs",
    operation_id = "events",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "The `id:` of the last event received: the stream replays what came after it"),
    ),
    responses(
        (status = 200, description = "Server-sent events: every event of the caller's own jobs as it is written (`id:` the event's place in the log of all events); it does not end; each event's data is an `EventView`", content_type = "text/event-stream", body = crate::view::StreamEvent),
        (status = 400, description = "A bad `Last-Event-ID`", body = ErrorBody),
        (status = 503, description = "Too many streams are open, or the job store is down; retry", body = ErrorBody),
    ),
)]
pub async fn owner_events(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    let reader = Reader::of(&headers);
    if reader.client.is_empty() {
        return Err(ApiError::new(ErrorCode::Unauthorized, "the stream of your jobs' events needs your API key (X-API-KEY)"));
    }
    let last: Option<i64> = last_event_id(&headers)?;
    let place = stream_place(&app)?;
    let watch = app.hub.watch_owner(&reader.client);
    let (tx, rx) = mpsc::channel(16);
    let outbox = Arc::clone(&app.stores.outbox);
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let _place = place;
        metrics::gauge!(crate::instruments::STREAMS, "stream" => "owner").increment(1.0);
        follow_owner(outbox.as_ref(), &reader.client, last, watch, &tx, shutdown).await;
        metrics::gauge!(crate::instruments::STREAMS, "stream" => "owner").decrement(1.0);
    });
    Ok(respond(&app, rx))
}

async fn follow_owner(
    outbox: &dyn pixmesh_store::Outbox,
    owner: &str,
    last: Option<i64>,
    mut watch: Watch,
    tx: &Frames,
    shutdown: Shutdown,
) {
    let send = |row: &OutboxEvent| tx.send(Ok(frame(row.id.to_string(), &row.event)));
    // Replayed ids: a live event that is one of them is not sent twice.
    let mut replayed: HashSet<i64> = HashSet::new();
    if let Some(mut after) = last {
        loop {
            let rows = match outbox.owner_events_after(owner, after, 500).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(owner, error = %e, "event stream: cannot read the events");
                    return drop(tx.send(Err(Cut::Store)).await);
                }
            };
            for row in &rows {
                if send(row).await.is_err() {
                    return;
                }
                replayed.insert(row.id);
                after = row.id;
            }
            if rows.len() < 500 {
                break;
            }
            if replayed.len() >= MAX_REPLAY {
                // The rest on the next connection, from `after`.
                return;
            }
        }
    }
    loop {
        let row = match next(&mut watch, tx, &shutdown).await {
            Some(Some(row)) => row,
            Some(None) => return drop(tx.send(Err(Cut::Slow)).await),
            None => return,
        };
        if replayed.remove(&row.id) {
            continue;
        }
        if send(&row).await.is_err() {
            return;
        }
    }
}
