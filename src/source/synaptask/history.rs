//! The history job: pages `history:page` for each scope from its position (the highest op id
//! already fetched) and sends the batches newer than it to the pipeline, oldest first, so the
//! checkpoint can follow them in order.
//!
//! The order of pages is not documented (DECISIONS #4). Newest first (the simulator's), paging
//! stops at the first batch at or below the position; batches that arrive at the head while it
//! pages shift later pages down, so some batches show up twice and are kept once (by
//! `batchId`); none is skipped. Oldest first is recognised from the op ids of a page and paged
//! to the end, starting near where the last catch-up ended.
//!
//! History "reaches back" when a batch at or below the position was seen. When it does not
//! (plan retention dropped older batches, or the server lacks `history:page`), the job reports
//! a gap: only a snapshot can reconcile that window.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::reads::{ReadError, Reader};
use super::GraphEvent;
use super::HistoryStart;
use crate::metrics::{inc, metrics};
use crate::normalize::history::max_op_id;
use crate::record::TraceContext;
use crate::source::SourceError;

/// Batches sent to the pipeline per event, so a long catch-up streams instead of arriving whole.
const CHUNK: usize = 200;

/// A history scope: `USER` + uid or `GRAPH` + a branch root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// `USER` or `GRAPH`.
    pub kind: &'static str,
    /// The uid or root node id.
    pub id: String,
}

impl Scope {
    /// The checkpoint key and record key: `USER:<uid>`, `GRAPH:<root>`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.id)
    }
}

/// Which way the server lists batches, once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Newest batch first (DECISIONS #4, the simulator).
    NewestFirst,
    /// Oldest batch first.
    OldestFirst,
}

/// What the source remembers of a scope between catch-ups.
#[derive(Debug, Clone, Default)]
pub struct ScopeState {
    /// Highest op id fetched and sent on (`None`: not positioned yet).
    pub cursor: Option<u64>,
    /// The server's order, once seen.
    pub order: Option<Order>,
    /// For an oldest-first server: where the last catch-up ended (its offset).
    pub resume: u64,
}

/// Why a scope could not be replayed from its position.
#[derive(Debug, Clone)]
pub struct Gap {
    /// The scope.
    pub scope: String,
    /// Its position.
    pub from_op_id: u64,
    /// The oldest op id history still listed.
    pub oldest_available_op_id: Option<u64>,
    /// `retention`, `history_unavailable` or `too_far_behind`.
    pub reason: String,
}

/// How a catch-up ended.
pub enum CatchUpEnd {
    /// Every scope was paged (some may have gaps).
    Done(Vec<Gap>),
    /// A read failed for good.
    Failed(ReadError),
}

/// The ack's batch objects, moved out of it rather than copied: a catch-up page holds up to
/// 1,000 of them.
fn take_batches(ack: &mut Value) -> Vec<Map<String, Value>> {
    match ack.get_mut("batches").map(Value::take) {
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|b| match b {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn order_of(batches: &[Map<String, Value>]) -> Option<Order> {
    let ids: Vec<u64> = batches.iter().filter_map(max_op_id).collect();
    match (ids.first(), ids.last()) {
        (Some(a), Some(b)) if a > b => Some(Order::NewestFirst),
        (Some(a), Some(b)) if a < b => Some(Order::OldestFirst),
        _ => None,
    }
}

fn request(scope: &Scope, limit: u32, offset: u64) -> Value {
    json!({"scopeType": scope.kind, "scopeId": scope.id, "limit": limit, "offset": offset})
}

/// Positions a scope that has none at the head of its history (`history_start = "latest"`):
/// the highest op id listed now, or 0 for an empty history.
pub async fn probe_head(r: &Reader, scope: &Scope, st: &mut ScopeState) -> Result<(), ReadError> {
    let mut offset = 0u64;
    let mut head = 0u64;
    loop {
        let limit = if offset == 0 {
            2
        } else {
            r.cfg.history_page_limit
        };
        let mut ack = r
            .read("history:page", request(scope, limit, offset))
            .await?;
        let more = ack.get("hasMore").and_then(Value::as_bool) == Some(true);
        let batches = take_batches(&mut ack);
        if st.order.is_none() {
            st.order = order_of(&batches);
        }
        head = head.max(batches.iter().filter_map(max_op_id).max().unwrap_or(0));
        // Newest first (or unknown), the first page has the head; oldest first, the last one.
        if st.order != Some(Order::OldestFirst) || !more || batches.is_empty() {
            if st.order == Some(Order::OldestFirst) {
                st.resume = offset + batches.len() as u64;
            }
            break;
        }
        offset += batches.len() as u64;
    }
    tracing::info!(scope = %scope.key(), head, "history positioned at its head");
    st.cursor = Some(head);
    Ok(())
}

/// One scope's catch-up: sends every batch above the position, oldest first, and moves the
/// position. `Ok(Some(gap))` when history did not reach back to it.
async fn catch_up_scope(
    r: &Reader,
    scope: &Scope,
    st: &mut ScopeState,
    first_limit: u32,
) -> Result<Result<Option<Gap>, ReadError>, SourceError> {
    let cursor = st.cursor.unwrap_or(0);
    let key = scope.key();
    let mut collected: Vec<(u64, Map<String, Value>)> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    // A batch at or below the position was seen: history reaches back to it.
    let mut reached = false;
    let mut oldest: Option<u64> = None;
    let mut offset = if st.order == Some(Order::OldestFirst) {
        st.resume.saturating_sub(1)
    } else {
        0
    };
    let mut restarted = false;
    let mut trace;
    let mut pages = 0u32;
    let mut progress = crate::progress::Progress::start(
        "history",
        None,
        u64::from(r.cfg.history_page_limit),
        r.cfg.read_interval(),
    );
    loop {
        let limit = if pages == 0 {
            first_limit
        } else {
            r.cfg.history_page_limit
        };
        let asked = std::time::Instant::now();
        let read = r.read("history:page", request(scope, limit, offset)).await;
        tracing::debug!(scope = %key, offset, limit, ms = asked.elapsed().as_millis() as u64, "history page read");
        let mut ack = match read {
            Ok(ack) => ack,
            Err(ReadError::NotImplemented(code)) => {
                return Ok(Ok(Some(Gap {
                    scope: key,
                    from_op_id: cursor,
                    oldest_available_op_id: None,
                    reason: format!("history_unavailable ({code})"),
                })))
            }
            Err(e) => return Ok(Err(e)),
        };
        pages += 1;
        trace = ack
            .get("trace_id")
            .and_then(Value::as_str)
            .map_or_else(TraceContext::new_root, TraceContext::from_source);
        if let Some(list) = ack.get("batches").and_then(Value::as_array) {
            for bad in list.iter().filter(|b| !b.is_object()) {
                r.malformed(
                    "history:page",
                    bad.to_string().into_bytes(),
                    "history batch is not an object".into(),
                )
                .await?;
            }
        }
        let more = ack.get("hasMore").and_then(Value::as_bool) == Some(true);
        let batches = take_batches(&mut ack);
        let listed = batches.len() as u64;
        progress.page(listed);
        if st.order.is_none() {
            st.order = order_of(&batches);
        }
        let oldest_first = st.order == Some(Order::OldestFirst);
        // An oldest-first server starting past our position (retention moved the list): page
        // from the start once.
        if oldest_first && pages == 1 && offset > 0 && !restarted {
            let first = batches.iter().filter_map(max_op_id).next();
            if first.is_none_or(|f| f > cursor) {
                offset = 0;
                restarted = true;
                pages = 0;
                continue;
            }
        }
        for b in batches {
            let Some(m) = max_op_id(&b) else { continue };
            oldest = Some(oldest.map_or(m, |o: u64| o.min(m)));
            if m <= cursor {
                reached = true;
                continue;
            }
            let Some(id) = b.get("batchId").and_then(Value::as_str).map(str::to_string) else {
                r.malformed(
                    "history:page",
                    Value::Object(b).to_string().into_bytes(),
                    "history batch without a string batchId".into(),
                )
                .await?;
                continue;
            };
            if ids.insert(id) {
                collected.push((m, b));
            }
        }
        offset += listed;
        if oldest_first {
            st.resume = offset;
        }
        if (!oldest_first && reached) || !more {
            break;
        }
        if listed == 0 {
            tracing::warn!(
                offset,
                "history:page said hasMore with an empty page; ending the catch-up there"
            );
            break;
        }
        if collected.len() > r.cfg.history_max_batches {
            // The snapshot that follows stands for everything up to now: the next catch-up
            // starts at the head, not at this window again.
            st.cursor = collected.iter().map(|(m, _)| *m).max().or(st.cursor);
            return Ok(Ok(Some(Gap {
                scope: key,
                from_op_id: cursor,
                oldest_available_op_id: oldest,
                reason: "too_far_behind".into(),
            })));
        }
    }
    collected.sort_by_key(|(m, _)| *m);
    let newest = collected.last().map(|(m, _)| *m);
    let count = collected.len();
    let mut chunk = Vec::with_capacity(CHUNK.min(count));
    for (_, b) in collected {
        chunk.push(b);
        if chunk.len() == CHUNK {
            r.send(GraphEvent::History {
                scope: key.clone(),
                batches: std::mem::take(&mut chunk),
                trace: trace.clone(),
            })
            .await?;
        }
    }
    if !chunk.is_empty() {
        r.send(GraphEvent::History {
            scope: key.clone(),
            batches: chunk,
            trace,
        })
        .await?;
    }
    metrics().history_batches_total.inc_by(count as u64);
    if let Some(n) = newest {
        st.cursor = Some(n.max(cursor));
    }
    if count > 0 {
        tracing::debug!(scope = %key, batches = count, pages, "history caught up");
    }
    // From op 0 there is nothing to reach back to: whatever is retained is the whole of it.
    if reached || cursor == 0 {
        return Ok(Ok(None));
    }
    Ok(Ok(Some(Gap {
        scope: key,
        from_op_id: cursor,
        oldest_available_op_id: oldest,
        reason: "retention".into(),
    })))
}

/// Catches every scope up; `first_limit` is the size of each scope's first page (small for a
/// periodic poll, where one page usually reaches back).
pub async fn run(
    r: &Reader,
    scopes: &[Scope],
    states: &mut HashMap<String, ScopeState>,
    first_limit: u32,
) -> Result<CatchUpEnd, SourceError> {
    inc(&metrics().history_catchups_total);
    let mut gaps = Vec::new();
    for scope in scopes {
        let st = states.entry(scope.key()).or_default();
        if st.cursor.is_none() {
            if r.cfg.history_start == HistoryStart::Earliest {
                // Everything history still serves is replayed.
                st.cursor = Some(0);
            } else {
                if let Err(e) = probe_head(r, scope, st).await {
                    return Ok(CatchUpEnd::Failed(e));
                }
                continue;
            }
        }
        match catch_up_scope(r, scope, st, first_limit).await? {
            Ok(None) => {}
            Ok(Some(gap)) => {
                tracing::warn!(scope = %gap.scope, from = gap.from_op_id, oldest = ?gap.oldest_available_op_id,
                    reason = %gap.reason, "history does not reach back to the delivered position");
                gaps.push(gap)
            }
            Err(e) => return Ok(CatchUpEnd::Failed(e)),
        }
    }
    r.send(GraphEvent::CatchUpDone).await?;
    Ok(CatchUpEnd::Done(gaps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str, ops: &[u64]) -> Map<String, Value> {
        json!({"batchId": id, "ops": ops.iter().map(|o| json!({"id": o})).collect::<Vec<_>>()})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn order_is_read_from_op_ids() {
        assert_eq!(
            order_of(&[batch("b", &[5, 6]), batch("a", &[3])]),
            Some(Order::NewestFirst)
        );
        assert_eq!(
            order_of(&[batch("a", &[3]), batch("b", &[5, 6])]),
            Some(Order::OldestFirst)
        );
        assert_eq!(order_of(&[batch("a", &[3])]), None);
    }

    #[test]
    fn scope_keys() {
        let s = Scope {
            kind: "USER",
            id: "u1".into(),
        };
        assert_eq!(s.key(), "USER:u1");
    }
}
