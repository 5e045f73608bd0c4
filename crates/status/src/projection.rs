//! The status read model: every job's view in `job_views`, kept current from the events by a
//! projector that follows the outbox, so a status read applies at most the few events the
//! projector has not reached yet, and a listing of a key's jobs reads one index, never
//! histories. The projection is disposable: [`rebuild`] makes it again from the events.
//!
//! The projector is choreographed, not orchestrated: it reacts to committed events, is on no
//! job's critical path, and several status processes may run one each. Writes are idempotent
//! (a view is only replaced by one with a higher `seq`), and its place in the outbox is saved
//! with each batch, so a restarted projector goes on where it left off. An event it finds out
//! of order (a view it never saw begin, one that skipped a number) makes it read that job's
//! history from the view's `seq` on: the projection repairs itself.

use crate::live::POLL;
use pixmesh_store::tail::{EventCursor, GAP_TIMEOUT};
use pixmesh_store::{JobStore, JobView, OutboxEvent, StoreError, StoredView, Stores, Views, fold};
use std::collections::HashMap;
use std::time::Duration;

/// Events read per round.
const BATCH: u32 = 512;

/// Jobs read and written per round of a rebuild.
const REBUILD_BATCH: u32 = 500;

/// `view` with the events after its `seq` applied: what the job's status is now. The events
/// come from the store (`events_since`): the view may be a few milliseconds behind them.
pub fn current(mut view: JobView, newer: &[pixmesh_store::JobEvent]) -> JobView {
    for event in newer {
        if event.seq > view.seq {
            pixmesh_store::apply(&mut view, event);
        }
    }
    view
}

/// Follows the outbox from the saved place (or the first event) and keeps `job_views` current,
/// looking for new events every `poll` (one write transaction per round that finds some), until
/// the task is dropped. A round that fails is tried again from the same place.
pub async fn run(stores: Stores, poll: Duration) {
    let start = loop {
        match stores.views.projector_cursor().await {
            Ok(saved) => break saved.unwrap_or(0),
            Err(e) => {
                tracing::warn!(error = %e, "status projection: cannot read its place; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut cursor = EventCursor::new(start);
    let mut saved = start;
    loop {
        let rows = match cursor.unread(stores.outbox.as_ref(), BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "status projection: cannot read the outbox; trying again");
                tokio::time::sleep(POLL * 10).await;
                continue;
            }
        };
        let full = rows.len() as u32 == BATCH;
        if !rows.is_empty() {
            match project(&stores, &rows).await {
                Ok(views) => {
                    for row in &rows {
                        cursor.published(row.id);
                    }
                    cursor.advance(GAP_TIMEOUT);
                    if let Err(e) = stores.views.put_views(&views, Some(cursor.cursor())).await {
                        tracing::warn!(error = %e, "status projection: cannot write views; trying again");
                        tokio::time::sleep(POLL * 10).await;
                        continue;
                    }
                    saved = cursor.cursor();
                    metrics::counter!(crate::instruments::PROJECTED_EVENTS).increment(rows.len() as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "status projection: cannot fold events; trying again");
                    tokio::time::sleep(POLL * 10).await;
                    continue;
                }
            }
        } else {
            cursor.advance(GAP_TIMEOUT);
            // Gaps that timed out moved the place: saved too, with no view to write.
            if cursor.cursor() > saved && stores.views.put_views(&[], Some(cursor.cursor())).await.is_ok() {
                saved = cursor.cursor();
            }
        }
        if !full {
            tokio::time::sleep(poll).await;
        }
    }
}

/// The views that `rows` change, each with every event of the batch applied.
async fn project(stores: &Stores, rows: &[OutboxEvent]) -> Result<Vec<StoredView>, StoreError> {
    let mut ids: Vec<String> = Vec::new();
    for row in rows {
        if !ids.contains(&row.event.job_id) {
            ids.push(row.event.job_id.clone());
        }
    }
    let mut views: HashMap<String, StoredView> = stores.views.views_of(&ids).await?.into_iter().map(|v| (v.view.id.clone(), v)).collect();
    // The owners of the jobs new to the projection, in one read (their first events are in
    // this batch, almost always from `accepted` on).
    let new: Vec<String> = ids.iter().filter(|id| !views.contains_key(*id)).cloned().collect();
    let owners: HashMap<String, String> = stores.views.owners(&new).await?.into_iter().collect();
    let mut changed: Vec<String> = Vec::new();
    for row in rows {
        let id = &row.event.job_id;
        let event = &row.event;
        let next = match views.get_mut(id) {
            Some(stored) if event.seq <= stored.view.seq => continue,
            Some(stored) if event.seq == stored.view.seq + 1 => {
                pixmesh_store::apply(&mut stored.view, event);
                None
            }
            Some(stored) => {
                // A gap: the history from the view's place says what is between.
                let newer = stores.jobs.events_since(id, stored.view.seq).await?;
                stored.view = current(stored.view.clone(), &newer);
                None
            }
            None => {
                // A job this projection has not seen: from its first event, here; from its
                // history when this batch starts later (a projector that starts mid-way).
                let Some(owner) = owners.get(id) else { continue };
                let view = match event.seq {
                    1 => fold(std::slice::from_ref(event)),
                    _ => fold(&stores.jobs.events(id).await?),
                };
                let Some(view) = view else { continue };
                Some(StoredView { owner: owner.clone(), view })
            }
        };
        if let Some(view) = next {
            views.insert(id.clone(), view);
        }
        if !changed.contains(id) {
            changed.push(id.clone());
        }
    }
    Ok(changed.into_iter().filter_map(|id| views.remove(&id)).collect())
}

/// Makes the projection again from the events: deletes every view, then folds every job's
/// history and writes it. A projector running meanwhile loses nothing (a view is only
/// replaced by a later one, whichever of the two writes first). Returns how many views it wrote.
pub async fn rebuild(jobs: &dyn JobStore, views: &dyn Views) -> Result<u64, StoreError> {
    views.clear_views().await?;
    let mut after = String::new();
    let mut written = 0u64;
    loop {
        let batch = views.jobs_after(&after, REBUILD_BATCH).await?;
        let Some((last, _)) = batch.last() else { break };
        after = last.clone();
        let mut folded = Vec::with_capacity(batch.len());
        for (id, owner) in batch {
            if let Some(view) = fold(&jobs.events(&id).await?) {
                folded.push(StoredView { owner, view });
            }
        }
        written += folded.len() as u64;
        views.put_views(&folded, None).await?;
    }
    Ok(written)
}
