//! The simulator's entities (users, nodes, links) and how each renders as SynapTask JSON.
//!
//! Field names and shapes follow seeds 000-003: camelCase in event payloads and read acks,
//! PascalCase in history patches.

use serde_json::{json, Map, Value};
use uuid::Uuid;

/// Node status codes (`/concepts/nodes`).
pub mod status {
    /// Available.
    pub const AVAILABLE: u8 = 0;
    /// In progress.
    pub const IN_PROGRESS: u8 = 1;
    /// Blocked by an unfinished child; never set by a client.
    pub const BLOCKED: u8 = 2;
    /// Completed.
    pub const COMPLETED: u8 = 3;
}

/// History op codes, DECISIONS #9 (the concept table).
pub mod op {
    /// NODE_ADD
    pub const NODE_ADD: u8 = 0;
    /// NODE_UPDATE
    pub const NODE_UPDATE: u8 = 1;
    /// NODE_STATUS
    pub const NODE_STATUS: u8 = 2;
    /// NODE_TRASH
    pub const NODE_TRASH: u8 = 3;
    /// NODE_RESTORE
    pub const NODE_RESTORE: u8 = 4;
    /// NODE_DELETE
    pub const NODE_DELETE: u8 = 5;
    /// NODE_PUBLISH
    pub const NODE_PUBLISH: u8 = 6;
    /// LINK_ADD
    pub const LINK_ADD: u8 = 10;
    /// LINK_TYPE
    pub const LINK_TYPE: u8 = 11;
    /// LINK_UPDATE
    pub const LINK_UPDATE: u8 = 12;
    /// LINK_TRASH
    pub const LINK_TRASH: u8 = 13;
    /// LINK_RESTORE
    pub const LINK_RESTORE: u8 = 14;
    /// LINK_DELETE
    pub const LINK_DELETE: u8 = 15;
}

/// An API user of the simulator.
#[derive(Debug, Clone)]
pub struct User {
    /// The user id (uuid v4 string), as `connected.uid`.
    pub uid: String,
    /// The bearer token that authenticates this user.
    pub token: String,
    /// Public handle, shown as `ownerUsername` and in history actors.
    pub username: String,
    /// Login email, shown as `ownerEmail`.
    pub email: String,
}

/// A task node; `owner` indexes the simulator's user list.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: Uuid,
    pub owner: usize,
    /// Creation order; links only point from a newer node to an older one, which keeps the graph acyclic.
    pub seq: u64,
    pub title: String,
    pub description: String,
    pub status: u8,
    pub due_date: Option<String>,
    pub kind: i64,
    pub tags: Vec<String>,
    pub priority: u8,
    pub independent: bool,
    pub volume: u8,
    pub version: u64,
    pub assignee: Vec<String>,
    pub created_time: String,
    pub last_edited_time: String,
    pub public_token: Option<String>,
    pub public_due: Option<String>,
    pub public_branch: bool,
    pub x: f64,
    pub y: f64,
    pub z: f64,
    pub pinned: bool,
    pub collapsed: bool,
    pub in_trash: bool,
    pub last_batch: Uuid,
}

/// A dependency link: `source` is the child, `target` the parent.
#[derive(Debug, Clone)]
pub struct Link {
    pub id: Uuid,
    pub owner: usize,
    pub source: Uuid,
    pub target: Uuid,
    pub kind: u8,
    pub private: bool,
    pub was_blocker: bool,
    pub in_trash: bool,
    pub version: u64,
    pub created_time: String,
    pub last_edited_time: String,
    pub last_batch: Uuid,
}

fn uuids(ids: &[Uuid]) -> Value {
    Value::Array(ids.iter().map(|r| Value::String(r.to_string())).collect())
}

impl Node {
    /// The node as `graph:get` returns it (seed 001), for its owner.
    pub fn api_json(&self, owner: &User, share_roots: &[Uuid]) -> Value {
        json!({
            "id": self.id.to_string(),
            "title": self.title,
            "description": self.description,
            "status": self.status,
            "dueDate": self.due_date,
            "type": self.kind,
            "tags": self.tags,
            "priority": self.priority,
            "independent": self.independent,
            "volume": self.volume,
            "version": self.version,
            "assignee": self.assignee,
            "createdTime": self.created_time,
            "lastEditedTime": self.last_edited_time,
            "ownerUsername": owner.username,
            "ownerEmail": owner.email,
            "publicToken": self.public_token,
            "publicDue": self.public_due,
            "x": self.x,
            "y": self.y,
            "z": self.z,
            "pinned": self.pinned,
            "collapsed": self.collapsed,
            "access": 0,
            "shareRoots": uuids(share_roots),
        })
    }

    /// The camelCase value of one mutable field, as diffs carry it.
    pub fn field(&self, name: &str) -> Value {
        match name {
            "title" => json!(self.title),
            "description" => json!(self.description),
            "status" => json!(self.status),
            "dueDate" => json!(self.due_date),
            "tags" => json!(self.tags),
            "priority" => json!(self.priority),
            "independent" => json!(self.independent),
            "volume" => json!(self.volume),
            "assignee" => json!(self.assignee),
            "publicToken" => json!(self.public_token),
            "publicDue" => json!(self.public_due),
            "publicBranch" => json!(self.public_branch),
            "inTrash" => json!(self.in_trash),
            _ => Value::Null,
        }
    }
}

impl Link {
    /// The link as `graph:get` returns it: only these six fields (facts §2.2).
    pub fn api_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "source": self.source.to_string(),
            "target": self.target.to_string(),
            "type": self.kind,
            "version": self.version,
            "wasBlocker": self.was_blocker,
        })
    }

    /// The link as creation and restore diffs carry it: every field.
    pub fn full_json(&self, share_roots: &[Uuid]) -> Value {
        json!({
            "id": self.id.to_string(),
            "source": self.source.to_string(),
            "target": self.target.to_string(),
            "type": self.kind,
            "private": self.private,
            "wasBlocker": self.was_blocker,
            "inTrash": self.in_trash,
            "version": self.version,
            "createdTime": self.created_time,
            "lastEditedTime": self.last_edited_time,
            "lastBatchID": self.last_batch.to_string(),
            "shareRoots": uuids(share_roots),
        })
    }

    /// The camelCase value of one mutable field.
    pub fn field(&self, name: &str) -> Value {
        match name {
            "type" => json!(self.kind),
            "private" => json!(self.private),
            "wasBlocker" => json!(self.was_blocker),
            "inTrash" => json!(self.in_trash),
            _ => Value::Null,
        }
    }
}

/// The PascalCase key history patches use for a camelCase field (`id` → `ID`, `title` → `Title`).
pub fn pascal(field: &str) -> String {
    match field {
        "id" => "ID".to_string(),
        "lastBatchID" => "LastBatchID".to_string(),
        _ => {
            let mut chars = field.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        }
    }
}

/// Re-keys a camelCase object into PascalCase, for history patches.
pub fn pascal_object(fields: &Map<String, Value>) -> Value {
    Value::Object(fields.iter().map(|(k, v)| (pascal(k), v.clone())).collect())
}

/// Renders a list of ids as a JSON array of strings.
pub fn id_array(ids: &[Uuid]) -> Value {
    uuids(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pascal_case_keys() {
        assert_eq!(pascal("title"), "Title");
        assert_eq!(pascal("wasBlocker"), "WasBlocker");
        assert_eq!(pascal("id"), "ID");
        assert_eq!(pascal("inTrash"), "InTrash");
    }
}
