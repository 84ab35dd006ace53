//! The seeded mutation generator: builds the initial graph and then picks one plausible
//! mutation at a time (add, update, trash, restore and delete of nodes and links), drawing
//! every choice from the world's seeded random source so that a seed replays exactly.

use rand::seq::SliceRandom;
use rand::Rng;
use uuid::Uuid;

use super::model::status;
use super::world::{Applied, NewNode, NodePatch, World};

const VERBS: &[&str] = &[
    "Design",
    "Review",
    "Write",
    "Ship",
    "Test",
    "Refactor",
    "Plan",
    "Fix",
    "Measure",
    "Document",
    "Deploy",
    "Migrate",
    "Audit",
    "Prototype",
    "Benchmark",
];
const OBJECTS: &[&str] = &[
    "login flow",
    "billing page",
    "search index",
    "onboarding",
    "API gateway",
    "release notes",
    "data model",
    "cache layer",
    "mobile layout",
    "export job",
    "alerting",
    "dashboard",
    "sync engine",
    "backup policy",
    "access control",
];
const TAGS: &[&str] = &[
    "backend", "frontend", "urgent", "infra", "research", "bug", "design", "ops", "q3", "customer",
];
const PEOPLE: &[&str] = &["ana", "bo", "chen", "dara", "eli", "fatima", "gus", "hana"];

/// The initial graph to build before the generator runs.
#[derive(Debug, Clone, Copy)]
pub struct InitialSize {
    /// Nodes per simulator run (spread over the users).
    pub nodes: usize,
    /// Links, including the parent links of new nodes.
    pub links: usize,
}

fn title(w: &mut World) -> String {
    let v = VERBS.choose(&mut w.rng).copied().unwrap_or("Do");
    let o = OBJECTS.choose(&mut w.rng).copied().unwrap_or("thing");
    let n: u16 = w.rng.gen_range(1..1000);
    format!("{v} {o} #{n}")
}

fn tags(w: &mut World) -> Vec<String> {
    let k = w.rng.gen_range(0..=3);
    let mut t: Vec<String> = TAGS
        .choose_multiple(&mut w.rng, k)
        .map(|s| s.to_string())
        .collect();
    t.sort();
    t
}

fn assignee(w: &mut World) -> Vec<String> {
    let k = w.rng.gen_range(0..=2);
    PEOPLE
        .choose_multiple(&mut w.rng, k)
        .map(|s| s.to_string())
        .collect()
}

fn new_node(w: &mut World) -> NewNode {
    let status = match w.rng.gen_range(0..10) {
        0..=5 => status::AVAILABLE,
        6..=8 => status::IN_PROGRESS,
        _ => status::COMPLETED,
    };
    let due_date = if w.rng.gen_bool(0.3) {
        let days: i64 = w.rng.gen_range(1..90);
        Some(
            (chrono::Utc::now() + chrono::Duration::days(days))
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
        )
    } else {
        None
    };
    NewNode {
        title: title(w),
        description: format!("Generated task {}", w.rng.gen_range(0..100_000)),
        status,
        due_date,
        tags: tags(w),
        priority: w.rng.gen_range(0..=9),
        independent: w.rng.gen_bool(0.1),
        volume: w.rng.gen_range(0..=9),
        assignee: assignee(w),
    }
}

fn pick_owner(w: &mut World) -> usize {
    w.rng.gen_range(0..w.users.len())
}

/// Adds a node, under a random active parent of the same owner most of the time.
fn add_node(w: &mut World, owner: usize, parent_share: f64) -> Applied {
    let fields = new_node(w);
    let parent = if w.rng.gen_bool(parent_share) {
        w.sets[owner].active_nodes.pick(&mut w.rng).map(|p| {
            let kind = if w.rng.gen_bool(0.8) { 0 } else { 1 };
            (p, kind)
        })
    } else {
        None
    };
    w.add_node(owner, fields, parent)
}

fn add_link(w: &mut World, owner: usize) -> Option<Applied> {
    for _ in 0..6 {
        let a = w.sets[owner].active_nodes.pick(&mut w.rng)?;
        let b = w.sets[owner].active_nodes.pick(&mut w.rng)?;
        if let Some((s, t)) = w.link_candidate(a, b) {
            let kind = if w.rng.gen_bool(0.7) { 0 } else { 1 };
            return w.add_link(s, t, kind);
        }
    }
    None
}

/// Builds the initial graph: `nodes` nodes over the users (a few roots each, the rest hung
/// under an older node), extra links up to `links`, and a public token on some roots, one of
/// them opening its whole branch and one the root alone. Every step is a mutation with its
/// own history batch, exactly as later ones.
pub fn build_initial(w: &mut World, size: InitialSize) {
    let users = w.users.len().max(1);
    let mut made_links = 0usize;
    let mut roots: Vec<Uuid> = Vec::new();
    for i in 0..size.nodes {
        let owner = i % users;
        let is_root = w.sets[owner].active_nodes.len() < 3 || w.rng.gen_bool(0.03);
        let share = if is_root || made_links >= size.links {
            0.0
        } else {
            1.0
        };
        let applied = add_node(w, owner, share);
        made_links += applied.diff["links"].as_array().map_or(0, |l| l.len());
        if is_root {
            if let Some(id) = applied.diff["nodes"][0]["id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
            {
                roots.push(id);
            }
        }
    }
    let mut attempts = 0;
    while made_links < size.links && attempts < size.links * 4 + 10 {
        attempts += 1;
        let owner = pick_owner(w);
        if add_link(w, owner).is_some() {
            made_links += 1;
        }
    }
    for (i, root) in roots.iter().enumerate().take(4) {
        w.publish_node(*root, i % 2 == 0);
    }
}

/// Applies one random mutation and returns what it produced. Mutations that are not possible
/// right now (nothing in trash, say) fall back to adding a node, so every call changes the world.
pub fn step(w: &mut World) -> Applied {
    let owner = pick_owner(w);
    let roll = w.rng.gen_range(0..100);
    let attempt = match roll {
        0..=19 => None, // add a node, below
        20..=54 => update_node(w, owner),
        55..=59 => w.sets[owner].active_nodes.pick(&mut w.rng).and_then(|id| {
            // Keep graphs from emptying: only trash when there is plenty left.
            if w.sets[owner].active_nodes.len() > 5 {
                w.trash_node(id)
            } else {
                None
            }
        }),
        60..=63 => w.sets[owner]
            .trashed_nodes
            .pick(&mut w.rng)
            .and_then(|id| w.restore_node(id)),
        64..=66 => w.sets[owner]
            .trashed_nodes
            .pick(&mut w.rng)
            .and_then(|id| w.delete_node(id)),
        67..=78 => add_link(w, owner),
        79..=85 => w.sets[owner].active_links.pick(&mut w.rng).and_then(|id| {
            let kind = w.link(&id).map_or(0, |l| 1 - l.kind.min(1));
            w.update_link_type(id, kind)
        }),
        86..=92 => w.sets[owner]
            .active_links
            .pick(&mut w.rng)
            .and_then(|id| w.trash_link(id)),
        93..=96 => w.sets[owner]
            .trashed_links
            .pick(&mut w.rng)
            .and_then(|id| w.restore_link(id)),
        _ => w.sets[owner]
            .trashed_links
            .pick(&mut w.rng)
            .and_then(|id| w.delete_link(id)),
    };
    match attempt {
        Some(a) => a,
        None => add_node(w, owner, 0.85),
    }
}

fn update_node(w: &mut World, owner: usize) -> Option<Applied> {
    let id = w.sets[owner].active_nodes.pick(&mut w.rng)?;
    let mut patch = NodePatch::default();
    let fields = w.rng.gen_range(0..=2);
    for _ in 0..fields {
        match w.rng.gen_range(0..4) {
            0 => patch.title = Some(title(w)),
            1 => patch.tags = Some(tags(w)),
            2 => patch.priority = Some(w.rng.gen_range(0..=9)),
            _ => patch.assignee = Some(assignee(w)),
        }
    }
    let current = w.node(&id)?.status;
    if fields == 0 || w.rng.gen_bool(0.4) {
        let choices: Vec<u8> = [status::AVAILABLE, status::IN_PROGRESS, status::COMPLETED]
            .into_iter()
            .filter(|s| *s != current)
            .collect();
        patch.status = choices.choose(&mut w.rng).copied();
    }
    w.update_node(id, patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::User;

    fn users() -> Vec<User> {
        (1..=2)
            .map(|i| User {
                uid: format!("00000000-0000-4000-8000-00000000000{i}"),
                token: format!("tok{i}"),
                username: format!("user{i}"),
                email: format!("user{i}@example.test"),
            })
            .collect()
    }

    fn ids_after(seed: u64, steps: usize) -> Vec<String> {
        let mut w = World::new(users(), seed);
        build_initial(
            &mut w,
            InitialSize {
                nodes: 50,
                links: 60,
            },
        );
        (0..steps)
            .map(|_| {
                let a = step(&mut w);
                format!("{}", a.diff["nodes"].as_array().unwrap().len())
                    + &a.diff["nodes"][0]["id"].to_string()
                    + &a.diff["links"][0]["id"].to_string()
            })
            .collect()
    }

    #[test]
    fn same_seed_same_sequence() {
        assert_eq!(ids_after(42, 300), ids_after(42, 300));
        assert_ne!(ids_after(42, 50), ids_after(43, 50));
    }

    #[test]
    fn blocking_invariant_holds_after_many_steps() {
        let mut w = World::new(users(), 9);
        build_initial(
            &mut w,
            InitialSize {
                nodes: 200,
                links: 260,
            },
        );
        for _ in 0..3000 {
            step(&mut w);
        }
        let truth = w.truth(false);
        let nodes = truth["nodes"].as_array().unwrap();
        let by_id: std::collections::HashMap<&str, &serde_json::Value> = nodes
            .iter()
            .map(|n| (n["id"].as_str().unwrap(), n))
            .collect();
        for n in nodes.iter().filter(|n| n["inTrash"] == false) {
            let id = n["id"].as_str().unwrap();
            let blocked_by_child = truth["links"].as_array().unwrap().iter().any(|l| {
                l["target"] == id
                    && l["type"] == 0
                    && l["inTrash"] == false
                    && by_id
                        .get(l["source"].as_str().unwrap())
                        .is_some_and(|s| s["inTrash"] == false && s["status"] != 3)
            });
            let should = blocked_by_child && n["independent"] == false;
            assert_eq!(n["status"] == 2, should, "node {n}");
        }
        assert!(!truth["deleted"]["nodes"].as_array().unwrap().is_empty());
        assert!(truth["transitions"].as_array().unwrap().len() > 100);
    }
}
