//! Conformance of the simulator against a client nobody here wrote: the Python examples of
//! seeds 000-003, run with the real python-socketio client, their results checked against the
//! simulator's `/truth`.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::SimProcess;

const TOKEN: &str = "st_conformance_user_1";
const UID: &str = "7d7b6a3e-52f4-4c1e-9b0a-3f1d2c4b5a61";
const TOKEN2: &str = "st_conformance_user_2";
const UID2: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";

fn tokens() -> String {
    format!("{TOKEN}:{UID},{TOKEN2}:{UID2}")
}

/// Runs one script under `tests/conformance/` and returns the JSON it wrote to `$OUT`.
fn run_script(script: &str, sim: &SimProcess, token: &str, extra: &[(&str, &str)]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.json");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(script);
    let mut child = Command::new("python3")
        .arg(&path)
        .env("SERVER_URL", sim.url())
        .env("API_TOKEN", token)
        .env("OUT", &out)
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (the README test command installs what the tests need)");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait for python").is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            let output = child.wait_with_output().expect("python output");
            panic!(
                "{script} did not finish in 90 s\nstdout: {}\nstderr: {}\ncounters: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                sim.truth_light()["counters"]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("python output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}): {stderr}\nIs python-socketio installed? The README test command installs it \
         (pip install 'python-socketio[client]').\nsimulator log:\n{}",
        output.status,
        sim.log()
    );
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("{script} wrote no result: {e}; stderr: {stderr}"));
    serde_json::from_str(&text).expect("script result is JSON")
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_string())
        .collect()
}

fn by_id(list: &Value) -> HashMap<String, Value> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v.clone()))
        .collect()
}

/// Active nodes and links of `uid` in the truth.
fn visible(truth: &Value, uid: &str) -> (HashMap<String, Value>, HashMap<String, Value>) {
    let nodes: HashMap<String, Value> = by_id(&truth["nodes"])
        .into_iter()
        .filter(|(_, n)| n["ownerUid"] == uid && n["inTrash"] == false)
        .collect();
    let links = by_id(&truth["links"])
        .into_iter()
        .filter(|(_, l)| {
            l["ownerUid"] == uid
                && l["inTrash"] == false
                && nodes.contains_key(l["source"].as_str().unwrap_or_default())
                && nodes.contains_key(l["target"].as_str().unwrap_or_default())
        })
        .collect();
    (nodes, links)
}

/// The branch under `root`: the root and every node that reaches it through active links.
fn branch_of(
    root: &str,
    nodes: &HashMap<String, Value>,
    links: &HashMap<String, Value>,
) -> BTreeSet<String> {
    let mut members = BTreeSet::from([root.to_string()]);
    let mut stack = vec![root.to_string()];
    while let Some(n) = stack.pop() {
        for l in links.values().filter(|l| l["target"] == n.as_str()) {
            let s = l["source"].as_str().unwrap_or_default().to_string();
            if nodes.contains_key(&s) && members.insert(s.clone()) {
                stack.push(s);
            }
        }
    }
    members
}

fn assert_no_duplicates(list: &[String], what: &str) {
    let set: BTreeSet<&String> = list.iter().collect();
    assert_eq!(set.len(), list.len(), "{what}: duplicates across pages");
}

#[test]
fn graph_get_pages_the_whole_graph() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "3000",
        "--links",
        "3600",
        "--rate",
        "50",
        "--seed",
        "11",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    sim.pause();
    let got = run_script("graph_get.py", &sim, TOKEN, &[]);
    let truth = sim.truth_light();
    assert_eq!(got["errors"], Value::Array(vec![]));
    let (nodes, links) = visible(&truth, UID);
    let got_nodes = ids(&got["nodes"]);
    let got_links = ids(&got["links"]);
    assert_no_duplicates(&got_nodes, "nodes");
    assert_no_duplicates(&got_links, "links");
    assert!(
        got["pages"].as_u64().unwrap() >= 3,
        "expected several pages: {}",
        got["pages"]
    );
    assert_eq!(
        got_nodes.iter().cloned().collect::<BTreeSet<_>>(),
        nodes.keys().cloned().collect()
    );
    assert_eq!(
        got_links.iter().cloned().collect::<BTreeSet<_>>(),
        links.keys().cloned().collect()
    );
    // Every node as served equals the truth, field by field (the truth adds three fields).
    for n in got["nodes"].as_array().unwrap() {
        let mut t = nodes[n["id"].as_str().unwrap()].clone();
        for extra in ["inTrash", "publicBranch", "ownerUid"] {
            t.as_object_mut().unwrap().remove(extra);
        }
        assert_eq!(n, &t);
    }
    for l in got["links"].as_array().unwrap() {
        let t = &links[l["id"].as_str().unwrap()];
        for f in ["source", "target", "type", "version", "wasBlocker"] {
            assert_eq!(l[f], t[f], "link field {f}");
        }
        assert_eq!(
            l.as_object().unwrap().len(),
            6,
            "graph:get links carry six fields: {l}"
        );
    }
    // The other user's graph is not visible.
    assert!(got["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["ownerUsername"] == "user1"));
}

fn biggest_root(truth: &Value, uid: &str) -> (String, BTreeSet<String>) {
    let (nodes, links) = visible(truth, uid);
    let mut best = (String::new(), BTreeSet::new());
    for n in nodes.values() {
        let roots = n["shareRoots"].as_array().unwrap();
        if roots.len() == 1 && roots[0] == n["id"] {
            let members = branch_of(n["id"].as_str().unwrap(), &nodes, &links);
            if members.len() > best.1.len() {
                best = (n["id"].as_str().unwrap().to_string(), members);
            }
        }
    }
    best
}

#[test]
fn branch_get_pages_a_branch_by_root_and_by_public_token() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "800",
        "--links",
        "900",
        "--rate",
        "0",
        "--seed",
        "12",
    ]);
    let truth = sim.truth_light();
    let (root, members) = biggest_root(&truth, UID);
    assert!(
        members.len() > 50,
        "seed 12 should give a branch of some size, got {}",
        members.len()
    );
    let (_, links) = visible(&truth, UID);
    let branch_links: BTreeSet<String> = links
        .values()
        .filter(|l| {
            members.contains(l["source"].as_str().unwrap())
                && members.contains(l["target"].as_str().unwrap())
        })
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    // Three or four pages: within the five reads per ten seconds.
    let limit = ((members.len() + branch_links.len()) / 3 + 1).to_string();
    let got = run_script(
        "branch_get.py",
        &sim,
        TOKEN,
        &[("ROOT", &root), ("LIMIT", &limit)],
    );
    assert_eq!(got["errors"], Value::Array(vec![]));
    assert!(got["pages"].as_u64().unwrap() >= 3);
    let got_nodes = ids(&got["nodes"]);
    assert_no_duplicates(&got_nodes, "branch nodes");
    assert_eq!(got_nodes.into_iter().collect::<BTreeSet<_>>(), members);
    assert_eq!(
        ids(&got["links"]).into_iter().collect::<BTreeSet<_>>(),
        branch_links
    );

    // Public tokens, read by the other user: publicBranch=false gives the root alone.
    let published: Vec<&Value> = truth["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["publicToken"].is_string())
        .collect();
    let closed = published
        .iter()
        .find(|n| n["publicBranch"] == false)
        .expect("a root published without its branch");
    let got = run_script(
        "branch_get.py",
        &sim,
        TOKEN2,
        &[("ROOT", closed["publicToken"].as_str().unwrap())],
    );
    assert_eq!(
        ids(&got["nodes"]),
        vec![closed["id"].as_str().unwrap().to_string()]
    );
    assert_eq!(got["links"], Value::Array(vec![]));
    let open = published
        .iter()
        .find(|n| n["publicBranch"] == true)
        .expect("a root published with its branch");
    let owner = open["ownerUid"].as_str().unwrap();
    let (n2, l2) = visible(&truth, owner);
    let expected = branch_of(open["id"].as_str().unwrap(), &n2, &l2);
    let got = run_script(
        "branch_get.py",
        &sim,
        TOKEN2,
        &[("ROOT", open["publicToken"].as_str().unwrap())],
    );
    assert_eq!(
        ids(&got["nodes"]).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
    // An unknown token is an error ack, not a crash.
    let got = run_script("branch_get.py", &sim, TOKEN2, &[("ROOT", "no-such-token")]);
    assert_eq!(got["errors"][0]["ok"], false);
    assert_eq!(got["errors"][0]["error"], "bad_request.branch_not_found");
}

#[test]
fn history_page_pages_newest_first_with_ops() {
    let sim = SimProcess::start(&[
        "--tokens",
        &tokens(),
        "--nodes",
        "400",
        "--links",
        "450",
        "--rate",
        "100",
        "--seed",
        "13",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    sim.pause();
    let truth = sim.truth();
    let (root, _) = biggest_root(&truth, UID);
    let expected: Vec<&Value> = truth["batches"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|b| {
            b["ownerUid"] == UID
                && b["roots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == root.as_str())
        })
        .collect();
    assert!(
        expected.len() > 100,
        "history of the biggest branch: {}",
        expected.len()
    );
    // Three pages or so: within the five reads per ten seconds.
    let page_limit = (expected.len() / 3 + 1).to_string();
    let got = run_script(
        "history_page.py",
        &sim,
        TOKEN,
        &[("SCOPE_ID", &root), ("LIMIT", &page_limit)],
    );
    let batches = got["batches"].as_array().unwrap();
    assert!(got["acks"].as_array().unwrap().len() >= 2, "several pages");
    let got_ids: Vec<&Value> = batches.iter().map(|b| &b["batchId"]).collect();
    let want_ids: Vec<&Value> = expected.iter().map(|b| &b["batchId"]).collect();
    assert_eq!(got_ids, want_ids, "same batches, newest first");
    for b in batches {
        for k in ["batchId", "actor", "ts", "undone", "ops"] {
            assert!(b.get(k).is_some(), "batch field {k}");
        }
        for op in b["ops"].as_array().unwrap() {
            assert!(op["id"].is_u64() && op["type"].is_u64() && op["entityId"].is_string());
            assert!(op["guard"]["Version"].is_u64());
            for patch in ["forwardPatch", "inversePatch"] {
                for key in op[patch].as_object().unwrap().keys() {
                    assert!(
                        key.chars().next().unwrap().is_ascii_uppercase(),
                        "PascalCase patch key {key}"
                    );
                }
            }
        }
        // ops are chronological inside a batch
        let op_ids: Vec<u64> = b["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_u64().unwrap())
            .collect();
        assert!(op_ids.windows(2).all(|w| w[0] < w[1]));
    }
    for ack in got["acks"].as_array().unwrap() {
        assert_eq!(ack["trace_id"].as_str().unwrap().len(), 12);
    }
    // USER scope needs the caller's own uid.
    let got = run_script(
        "history_page.py",
        &sim,
        TOKEN,
        &[("SCOPE_TYPE", "USER"), ("SCOPE_ID", UID2), ("LIMIT", "10")],
    );
    assert_eq!(got["acks"][0]["error"], "bad_request.invalid_scope");
    let got = run_script(
        "history_page.py",
        &sim,
        TOKEN,
        &[("SCOPE_TYPE", "USER"), ("SCOPE_ID", UID), ("LIMIT", "1000")],
    );
    let own = truth["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ownerUid"] == UID)
        .count();
    assert_eq!(got["batches"].as_array().unwrap().len(), own);
}

#[test]
fn bad_or_missing_token_is_refused_as_documented() {
    let sim = SimProcess::start(&["--tokens", &tokens(), "--rate", "0"]);
    let got = run_script("connect_bad_token.py", &sim, "st_not_a_real_token", &[]);
    assert_eq!(got["connected"][0]["ok"], false, "{got}");
    assert_eq!(got["connected"][0]["error"], "unauthorized");
    assert!(
        !got["disconnect_reasons"].as_array().unwrap().is_empty(),
        "server disconnects: {got}"
    );
    let got = run_script("connect_bad_token.py", &sim, "", &[]);
    assert_eq!(
        got["connected"][0]["error"], "forbidden.auth_missing",
        "{got}"
    );
    assert_eq!(got["connected"][0]["message"], "Authentication required");
    let truth = sim.truth_light();
    assert_eq!(truth["counters"]["rejectedAuth"], 2);
    assert_eq!(truth["counters"]["connects"], 0);
}

#[test]
fn sixth_read_within_ten_seconds_is_rate_limited() {
    let sim = SimProcess::start(&["--tokens", &tokens(), "--rate", "0"]);
    let got = run_script("rate_limit.py", &sim, TOKEN, &[]);
    let acks = got["acks"].as_array().unwrap();
    assert_eq!(acks.len(), 6);
    for a in &acks[..5] {
        assert_eq!(a["ok"], true, "{a}");
    }
    assert!(acks[5]["elapsed"].as_f64().unwrap() < 10.0);
    assert_eq!(acks[5]["ok"], false);
    assert_eq!(acks[5]["error"], "rate_limited");
    assert_eq!(acks[5]["message"], "Too many requests, please slow down");
    let trace = acks[5]["trace_id"].as_str().unwrap();
    assert!(
        trace.len() == 12
            && trace
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let truth = sim.truth_light();
    assert_eq!(truth["counters"]["rateLimitedAcks"], 1);
    assert_eq!(truth["counters"]["limitViolations"]["reads"], 1);
}
