//! The snapshot job: pages `graph:get` (or `branch:get` for a branch-scoped source) under the
//! read budget, sending each page on at once, then
//! lists the trash (`trash:page`) so the pipeline can tell trashed from purged entities. Live
//! diffs keep flowing beside it (the session loop forwards them), so a long snapshot never
//! overflows the diff buffer.
//!
//! Paging follows what the server returned, not what was asked: the next offset is the last one
//! plus the objects received, less an overlap, so a server that caps pages below `limit` skips
//! nothing, and a page that is empty while claiming `hasMore` ends the snapshot instead of
//! looping. Pages shift left under concurrent removals (DECISIONS #6): the overlap is the
//! configured one plus every trash and purge the live stream showed since the last page, and a
//! page whose ack shows more removals than it stepped back over is read again.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::reads::{ReadError, Reader};
use super::GraphEvent;
use crate::metrics::{inc, metrics};
use crate::progress::Progress;
use crate::record::TraceContext;
use crate::source::{SourceError, SourceEvent};

/// How a snapshot ended.
pub enum SnapshotEnd {
    /// Every page was sent; this event closes the snapshot once the diffs that arrived before
    /// it are forwarded.
    Done(SourceEvent),
    /// A read failed for good.
    Failed(ReadError),
}

/// Times one page is read again because the listing shifted past the overlap, before the
/// snapshot moves on regardless (a graph losing objects faster than a page can follow).
const MAX_REREADS: u32 = 3;

/// The offset after a page of `returned` objects read at `offset`: the overlap re-reads part
/// of the page (at most half of it, so a small page still moves on).
pub fn next_offset(offset: u64, returned: u64, overlap: u64) -> u64 {
    let step = returned - overlap.min(returned / 2);
    offset + step.max(1)
}

/// Pages the graph and the trash, sending pages on as they come.
pub async fn run(r: &Reader) -> Result<SnapshotEnd, SourceError> {
    let started = std::time::Instant::now();
    let limit = r.cfg.page_limit;
    let mut offset: u64 = 0;
    let mut seen = crate::normalize::SeenKeys::default();
    let mut trace;
    let mut pages = 0u32;
    // A branch-scoped source pages its branch; `branch:get` takes the same paging.
    let (event, root) = match &r.cfg.root {
        Some(root) => ("branch:get", Some(root.clone())),
        None => ("graph:get", None),
    };
    let per_page = u64::from(r.cfg.page_limit.saturating_sub(r.cfg.page_overlap).max(1));
    let mut progress = Progress::start(
        "snapshot",
        Some(r.expected_objects()),
        per_page,
        r.cfg.read_interval(),
    );
    r.send(GraphEvent::SnapshotStart).await?;
    // The last page taken as read: its offset, its size, and the session's removal count when
    // it was answered. Entities removed since may have shifted the listing left (DECISIONS #6),
    // so the next page steps back by that many more objects than the fixed overlap. Removals
    // whose diffs are still on their way when a request is built are not counted yet: `late`
    // is the most of them seen so far, added as a margin (a loaded connector reads its socket
    // late, and the server removes on meanwhile).
    let mut last: Option<(u64, u64, u64)> = None;
    let mut late = 0u64;
    let mut rereads = 0u32;
    loop {
        if let Err(e) = r.wait_budget(event).await {
            return Ok(SnapshotEnd::Failed(e));
        }
        let mut stepped_back = 0u64;
        let mut counted = 0u64;
        if let Some((at, returned, mark)) = last {
            counted = r.removals().saturating_sub(mark);
            let overlap = u64::from(r.cfg.page_overlap) + counted + late;
            offset = next_offset(at, returned, overlap);
            stepped_back = (at + returned).saturating_sub(offset);
        }
        let mut request = json!({"limit": limit, "offset": offset});
        if let Some(root) = &root {
            request["root"] = json!(root);
        }
        let (mut ack, mark) = match r.read_marked(event, request).await {
            Ok(ack) => ack,
            Err(e) => return Ok(SnapshotEnd::Failed(e)),
        };
        // The removals the server broadcast between answering the last page and this one
        // are now all counted: more than this page stepped back over may have left objects
        // between the two unread. Its objects are still good; the page is read again from
        // further back (a few times at most, then the history catch-up is the backstop).
        let shifted = last.map_or(0, |(_, _, then)| mark.saturating_sub(then));
        late = late.max(shifted.saturating_sub(counted));
        let gap = shifted > stepped_back && rereads < MAX_REREADS;
        if gap {
            rereads += 1;
            inc(&metrics().snapshot_rereads_total);
            tracing::debug!(
                offset,
                shifted,
                stepped_back,
                "the listing shifted past the overlap; reading that page again from further back"
            );
        } else {
            rereads = 0;
        }
        pages += 1;
        trace = ack
            .get("trace_id")
            .and_then(Value::as_str)
            .map_or_else(TraceContext::new_root, TraceContext::from_source);
        let items = r.page_items(event, &mut ack).await?;
        let returned = items.len() as u64;
        progress.page(returned);
        seen.extend(
            items
                .iter()
                .filter_map(|(k, m)| m.get("id").and_then(Value::as_str).map(|id| k.key(id))),
        );
        inc(&metrics().source_events_total);
        let slot = r.page_slot().await?;
        r.send(GraphEvent::SnapshotPage {
            items,
            trace: trace.clone(),
            slot,
        })
        .await?;
        if gap {
            continue;
        }
        if ack.get("hasMore").and_then(Value::as_bool) != Some(true) {
            break;
        }
        if returned == 0 {
            tracing::warn!(
                offset,
                event,
                "a page said hasMore but was empty; ending the snapshot there"
            );
            break;
        }
        last = Some((offset, returned, mark));
    }
    let trash = if r.cfg.trash_listing {
        match trash(r).await? {
            Ok(t) => t,
            Err(ReadError::Lost(reason)) => {
                return Ok(SnapshotEnd::Failed(ReadError::Lost(reason)))
            }
            Err(ReadError::Shutdown) => return Ok(SnapshotEnd::Failed(ReadError::Shutdown)),
            Err(ReadError::NotImplemented(_)) => None,
        }
    } else {
        None
    };
    progress.finish();
    seen.seal();
    r.set_expected_objects(seen.len() as u64);
    inc(&metrics().snapshots_total);
    tracing::info!(
        pages,
        entities = seen.len(),
        trashed = trash.as_ref().map_or(0, HashMap::len),
        listing = trash.is_some(),
        secs = started.elapsed().as_secs_f64(),
        "snapshot read"
    );
    Ok(SnapshotEnd::Done(
        GraphEvent::SnapshotDone { seen, trash, trace }.into(),
    ))
}

/// `trash:page` until done. `Err(NotImplemented)` when the server lacks the event.
type TrashListing = Option<HashMap<String, Map<String, Value>>>;

async fn trash(r: &Reader) -> Result<Result<TrashListing, ReadError>, SourceError> {
    let mut trash = HashMap::new();
    let mut offset = 0u64;
    loop {
        let mut ack = match r
            .read("trash:page", json!({"limit": 1000, "offset": offset}))
            .await
        {
            Ok(ack) => ack,
            Err(ReadError::NotImplemented(code)) => {
                tracing::warn!(%code, "no trash listing: entities that left the graph cannot be told trashed from purged");
                return Ok(Err(ReadError::NotImplemented(code)));
            }
            Err(e) => return Ok(Err(e)),
        };
        let items = r.page_items("trash:page", &mut ack).await?;
        let returned = items.len() as u64;
        for (kind, m) in items {
            if let Some(id) = m.get("id").and_then(Value::as_str) {
                trash.insert(kind.key(id), m);
            }
        }
        if ack.get("hasMore").and_then(Value::as_bool) != Some(true) || returned == 0 {
            return Ok(Ok(Some(trash)));
        }
        offset += returned;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_what_the_server_returned() {
        // Full pages: limit minus the overlap.
        assert_eq!(next_offset(0, 5000, 50), 4950);
        // A server capping pages at 100 while 5000 were asked: no skipped objects.
        assert_eq!(next_offset(4950, 100, 50), 5000);
        // Pages smaller than twice the overlap still move on.
        assert_eq!(next_offset(10, 40, 50), 30);
        assert_eq!(next_offset(10, 1, 50), 11);
    }
}
