//! The container files, checked without Docker: `docker/Dockerfile`, `docker/compose.yaml`,
//! `docker/otel-collector.yaml` and the `.dockerignore` files. No image can be pulled where
//! taskstream is developed, so nothing here builds or starts a container; instead the files are
//! parsed and held to what the build and the connector need:
//!
//! - the Dockerfile is multi-stage with cargo-chef (prepare, `cook --release`, then the build,
//!   with the sources copied only after the cook), copies every workspace member, target
//!   directory and directory the sources `include_str!` from, and ends in a small image that
//!   runs as a non-root user with a `HEALTHCHECK` on `/health/ready`;
//! - the compose file starts Kafka (KRaft), a schema registry, NATS with JetStream, an
//!   OpenTelemetry collector, the simulator (`taskstream sim`) and taskstream, every one with a
//!   healthcheck, taskstream only once the others are healthy, publishing on 127.0.0.1 only;
//! - every `TASKSTREAM__*` variable (compose `environment`, Dockerfile `ENV`) is a real config
//!   key with a value of the right type: they are loaded by taskstream's own loader
//!   ([`Config::load`], whose sections all deny unknown fields) over the config file the image
//!   ships, one at a time (so an error names the variable) and all together (then the addresses
//!   must point at the compose services that serve them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use serde_yaml::{Mapping, Value};
use taskstream::config::{BodyFormat, Config};
use taskstream::sink::nats::NatsMode;

// ---------------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The config file the image copies to /etc/taskstream/taskstream.toml.
const SHIPPED_CONFIG: &str = "config/taskstream.toml";
/// Where the image puts it, and where its CMD points.
const IMAGE_CONFIG: &str = "/etc/taskstream/taskstream.toml";
/// The port of `/metrics` and `/health/ready` inside the container.
const METRICS_PORT: u16 = 9464;

// ---------------------------------------------------------------------------------------------
// The root Cargo.toml: what the build needs from the context

struct Manifest {
    /// `[workspace] members`.
    members: Vec<String>,
    /// Top-level paths of the root package's targets (`[lib]`, `[[bin]]`, `[[bench]]`,
    /// `[[test]]`, `[[example]]`), which cargo wants present to read the manifest.
    target_roots: BTreeSet<String>,
    /// Features of the rdkafka dependency.
    rdkafka_features: Vec<String>,
}

fn manifest() -> Manifest {
    let fig = Figment::from(Toml::file_exact(root().join("Cargo.toml")));
    let members: Vec<String> = fig
        .extract_inner("workspace.members")
        .expect("Cargo.toml has no [workspace] members list");
    let mut target_roots = BTreeSet::new();
    for (kind, default_dir) in [
        ("lib", "src"),
        ("bin", "src"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        // `[lib]` is a table, the others arrays of tables.
        let entries: Vec<toml_value::Target> = match fig.extract_inner(kind) {
            Ok(list) => list,
            Err(_) => fig.extract_inner(kind).map(|t| vec![t]).unwrap_or_default(),
        };
        for t in entries {
            let root = match t.path {
                Some(p) => top_level(Path::new(&p)),
                None => default_dir.to_string(),
            };
            target_roots.insert(root);
        }
    }
    // The default targets (src/lib.rs, src/main.rs) even without [lib] / [[bin]] tables.
    target_roots.insert("src".into());
    let rdkafka_features: Vec<String> = fig
        .extract_inner("dependencies.rdkafka.features")
        .unwrap_or_default();
    Manifest {
        members,
        target_roots,
        rdkafka_features,
    }
}

mod toml_value {
    /// A `[lib]` / `[[bin]]` / `[[bench]]` ... table; only `path` matters here.
    #[derive(Debug, serde::Deserialize)]
    pub struct Target {
        pub path: Option<String>,
    }
}

/// The first component of a relative path.
fn top_level(p: &Path) -> String {
    p.components()
        .find_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("path {} has no top-level component", p.display()))
}

/// `a/b/../c/./d` -> `a/c/d` (no filesystem access); `None` if it climbs above the start.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => out.clear(),
        }
    }
    Some(out.iter().collect())
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level paths of the repository that the binary's sources read at compile time:
/// `include_str!`, `include_bytes!`, `include!` and `#[path = ...]` in the root package's
/// `src/` and in every workspace member's `src/`, each with the places that read it.
fn compile_time_reads(members: &[String]) -> BTreeMap<String, Vec<String>> {
    let root = root();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    for m in members {
        rust_files(&root.join(m).join("src"), &mut files);
    }
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let rel_file = file
            .strip_prefix(&root)
            .expect("under the root")
            .to_path_buf();
        for (lineno, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for macro_name in ["include_str!(", "include_bytes!(", "include!(", "#[path"] {
                let mut rest = code;
                while let Some(at) = rest.find(macro_name) {
                    rest = &rest[at + macro_name.len()..];
                    let arg = rest.trim_start().trim_start_matches('=').trim_start();
                    let where_ = format!("{}:{}", rel_file.display(), lineno + 1);
                    let literal = string_literal(arg).unwrap_or_else(|| {
                        panic!(
                            "{where_}: {macro_name} ...) has no plain string literal; teach \
                             tests/container.rs to resolve it, so the Dockerfile check knows \
                             which directory it reads"
                        )
                    });
                    let base = file.parent().expect("a file has a parent");
                    let rel_base = base.strip_prefix(&root).expect("under the root");
                    let target = normalize(&rel_base.join(&literal)).unwrap_or_else(|| {
                        panic!("{where_}: {literal:?} points outside the repository")
                    });
                    found.entry(top_level(&target)).or_default().push(where_);
                }
            }
        }
    }
    found
}

/// The contents of a leading `"..."` (no escapes needed for paths).
fn string_literal(s: &str) -> Option<String> {
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    Some(s[..end].to_string())
}

// ---------------------------------------------------------------------------------------------
// A small Dockerfile reader: logical lines, stages, and the instructions this test needs

#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    op: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    instrs: Vec<Instr>,
}

#[derive(Debug)]
struct Dockerfile {
    stages: Vec<Stage>,
}

fn parse_dockerfile(text: &str) -> Dockerfile {
    // Join continuation lines; comment lines (also inside a continuation) are dropped.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.starts_with('#') || (cur.is_empty() && t.is_empty()) {
            continue;
        }
        if cur.is_empty() {
            start = i + 1;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head.trim_end());
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push((start, std::mem::take(&mut cur)));
            }
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<Stage> = Vec::new();
    for (line, l) in logical {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let instr = Instr {
            line,
            op: op.to_ascii_uppercase(),
            args: args.trim().to_string(),
        };
        if instr.op == "FROM" {
            let words: Vec<&str> = instr
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let base = words.first().expect("FROM names an image").to_string();
            let name = match words.get(1) {
                Some(w) if w.eq_ignore_ascii_case("as") => Some(
                    words
                        .get(2)
                        .expect("FROM ... AS names the stage")
                        .to_string(),
                ),
                _ => None,
            };
            stages.push(Stage {
                base,
                name,
                instrs: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instrs.push(instr);
        } else {
            assert!(
                instr.op == "ARG",
                "Dockerfile line {line}: only ARG may come before the first FROM, found {}",
                instr.op
            );
        }
    }
    Dockerfile { stages }
}

impl Dockerfile {
    fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    }

    /// The stage and the stages it is built `FROM`, oldest first.
    fn lineage(&self, idx: usize) -> Vec<usize> {
        let mut chain = vec![idx];
        let mut cur = idx;
        while let Some(parent) = self.stage_index(&self.stages[cur].base) {
            assert!(parent < cur, "stage {} is built from a later stage", cur);
            chain.push(parent);
            cur = parent;
        }
        chain.reverse();
        chain
    }

    /// Every instruction of a stage, its parents' first, with the WORKDIR in force at each.
    fn effective(&self, idx: usize) -> Vec<(Instr, String)> {
        let mut out = Vec::new();
        let mut workdir = "/".to_string();
        for s in self.lineage(idx) {
            for i in &self.stages[s].instrs {
                if i.op == "WORKDIR" {
                    workdir = resolve(&workdir, &i.args);
                }
                out.push((i.clone(), workdir.clone()));
            }
        }
        out
    }

    /// The (first) stage with a RUN containing all the words.
    fn stage_running(&self, words: &[&str]) -> Option<usize> {
        self.stages.iter().position(|s| {
            s.instrs
                .iter()
                .any(|i| i.op == "RUN" && words.iter().all(|w| i.args.contains(w)))
        })
    }
}

/// `dest` resolved against a working directory, normalized, without a trailing slash.
fn resolve(workdir: &str, dest: &str) -> String {
    let joined = if dest.starts_with('/') {
        PathBuf::from(dest)
    } else {
        Path::new(workdir).join(dest)
    };
    let norm = normalize(&joined).expect("a resolvable path");
    format!("/{}", norm.display())
}

/// Words of a shell-form argument list, honouring double quotes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// A JSON-array (exec form) argument, or its shell form as `sh -c`.
fn exec_form(args: &str) -> Vec<String> {
    if args.trim_start().starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("bad exec form {args:?}: {e}"))
    } else {
        vec!["/bin/sh".into(), "-c".into(), args.to_string()]
    }
}

/// `ENV` pairs (`K=V K2="V 2"`, or the legacy `K V`).
fn env_pairs(args: &str) -> Vec<(String, String)> {
    let first = args.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        let (k, v) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
        return vec![(k.to_string(), v.trim().to_string())];
    }
    words(args)
        .into_iter()
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV word {w:?} is not KEY=VALUE"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A COPY's flags, sources and destination.
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

fn parse_copy(args: &str) -> Copy {
    let mut from = None;
    let mut rest = Vec::new();
    let list: Vec<String> = if args.contains('[') {
        let (flags, json) = args.split_at(args.find('[').expect("a ["));
        rest.extend(
            serde_json::from_str::<Vec<String>>(json)
                .unwrap_or_else(|e| panic!("bad COPY {args:?}: {e}")),
        );
        words(flags)
    } else {
        words(args)
    };
    let mut plain = Vec::new();
    for w in list {
        if let Some(f) = w.strip_prefix("--from=") {
            from = Some(f.to_string());
        } else if !w.starts_with("--") {
            plain.push(w);
        }
    }
    plain.extend(rest);
    let dest = plain
        .pop()
        .unwrap_or_else(|| panic!("COPY {args:?} has no destination"));
    assert!(!plain.is_empty(), "COPY {args:?} has no source");
    Copy {
        from,
        sources: plain,
        dest,
    }
}

/// Where a context COPY puts `source`, given the WORKDIR in force.
fn copy_target(copy: &Copy, source: &str, workdir: &str) -> String {
    let src_is_dir = root().join(source).is_dir() || source == "." || source.ends_with('/');
    let dest_is_dir =
        copy.dest.ends_with('/') || copy.dest == "." || copy.sources.len() > 1 || src_is_dir;
    let dest = resolve(workdir, &copy.dest);
    if dest_is_dir && !src_is_dir {
        let name = Path::new(source).file_name().expect("a file name");
        resolve(&dest, &name.to_string_lossy())
    } else {
        dest
    }
}

fn trim_path(s: &str) -> &str {
    let s = s.strip_prefix("./").unwrap_or(s);
    let s = s.trim_end_matches('/');
    if s.is_empty() {
        "."
    } else {
        s
    }
}

/// Lines of a .dockerignore, without comments, leading `/` or trailing `/`.
fn dockerignore(rel: &str) -> Vec<String> {
    let path = root().join(rel);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect()
}

/// Whether .dockerignore keeps `path` (a top-level name) out of the context. Simple patterns
/// only: an exact name, `*` / `**`, or `name/...`; negations are not honoured (and not used).
fn ignored(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| {
        p == path
            || p == "*"
            || p == "**"
            || p == "**/*"
            || p.strip_prefix("**/").is_some_and(|rest| rest == path)
    })
}

/// The instruction index at which `path` (a top-level repository path) reaches the stage's
/// working tree `build_dir`, or a message saying why it does not.
fn copied_at(
    effective: &[(Instr, String)],
    path: &str,
    build_dir: &str,
    ignore: &[String],
) -> Result<usize, String> {
    let want = resolve(build_dir, path);
    let mut misplaced = None;
    for (n, (instr, workdir)) in effective.iter().enumerate() {
        if instr.op != "COPY" && instr.op != "ADD" {
            continue;
        }
        let copy = parse_copy(&instr.args);
        if copy.from.is_some() {
            continue;
        }
        for src in &copy.sources {
            let src = trim_path(src);
            let hit = if src == "." {
                // The whole context lands in the destination.
                resolve(workdir, &copy.dest) == build_dir && !ignored(ignore, path)
            } else {
                src == path && copy_target(&copy, src, workdir) == want
            };
            if hit {
                return Ok(n);
            }
            if src == path && misplaced.is_none() {
                misplaced = Some(format!(
                    "line {} copies {path} to {} but the build runs in {build_dir}, so cargo \
                     looks for it at {want}",
                    instr.line,
                    copy_target(&copy, src, workdir)
                ));
            }
        }
    }
    if let Some(m) = misplaced {
        return Err(m);
    }
    if ignored(ignore, path) {
        return Err(format!(".dockerignore excludes {path}"));
    }
    Err(format!("no COPY of {path} to {want}"))
}

/// Whether any `.rs` file under these directories contains `needle` (a route's path literal).
fn sources_mention(dirs: &[PathBuf], needle: &str) -> bool {
    let mut files = Vec::new();
    for d in dirs {
        rust_files(d, &mut files);
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f)
            .map(|t| t.contains(needle))
            .unwrap_or(false)
    })
}

fn dockerfile() -> Dockerfile {
    parse_dockerfile(&read("docker/Dockerfile"))
}

/// Index into `effective` of the first RUN containing all the words.
fn run_at(effective: &[(Instr, String)], needle: &[&str]) -> Option<usize> {
    effective
        .iter()
        .position(|(i, _)| i.op == "RUN" && needle.iter().all(|w| i.args.contains(w)))
}

// ---------------------------------------------------------------------------------------------
// Dockerfile checks

#[test]
fn dockerfile_builds_in_stages_with_cargo_chef() {
    let df = dockerfile();
    assert!(
        df.stages.len() >= 3,
        "docker/Dockerfile needs separate stages (planner, builder, runtime); found {} FROM",
        df.stages.len()
    );
    let planner = df
        .stage_running(&["cargo chef prepare"])
        .expect("no stage runs `cargo chef prepare` (the cargo-chef planner)");
    let builder = df
        .stage_running(&["cargo build", "--release"])
        .expect("no stage runs `cargo build --release`");
    let planner_name = df.stages[planner]
        .name
        .clone()
        .expect("the planner stage needs a name (FROM ... AS planner) to copy its recipe from");
    let eff = df.effective(builder);
    let cook = run_at(&eff, &["cargo chef cook", "--release"]).unwrap_or_else(|| {
        panic!(
            "the builder stage (line {}) does not run `cargo chef cook --release` before its \
             build, so dependencies are not cached in their own layer",
            eff[0].0.line
        )
    });
    let build = run_at(&eff, &["cargo build", "--release"]).expect("the build RUN");
    assert!(
        cook < build,
        "`cargo chef cook` must come before `cargo build`"
    );
    assert!(
        eff[..cook].iter().any(|(i, _)| i.op == "COPY"
            && parse_copy(&i.args)
                .from
                .is_some_and(|f| f.eq_ignore_ascii_case(&planner_name))
            && i.args.contains("recipe.json")),
        "the builder must COPY --from={planner_name} the recipe.json before cooking"
    );
    for needs_chef in [planner, builder] {
        let has_chef = df.effective(needs_chef).iter().any(|(i, _)| {
            i.op == "RUN" && i.args.contains("cargo install") && i.args.contains("cargo-chef")
        }) || df
            .lineage(needs_chef)
            .iter()
            .any(|&s| df.stages[s].base.contains("cargo-chef"));
        assert!(
            has_chef,
            "stage {:?} runs cargo chef but neither installs cargo-chef nor is built from an \
             image that has it",
            df.stages[needs_chef].name
        );
    }
    // The sources come after the cook: otherwise any source change re-cooks every dependency.
    let build_dir = eff[build].1.clone();
    for src in ["src", "Cargo.toml"] {
        let at = copied_at(&eff, src, &build_dir, &dockerignore(".dockerignore"))
            .unwrap_or_else(|e| panic!("builder stage: {e}"));
        assert!(
            at > cook,
            "the builder copies {src} (line {}) before `cargo chef cook`, so every source change \
             rebuilds all dependencies; copy only recipe.json before the cook",
            eff[at].0.line
        );
    }
}

#[test]
fn dockerfile_copies_everything_the_workspace_build_reads() {
    let df = dockerfile();
    let m = manifest();
    let ignore = dockerignore(".dockerignore");
    let mut needed: Vec<(String, String)> = vec![
        ("Cargo.toml".into(), "the root manifest".into()),
        ("Cargo.lock".into(), "the lock file (--locked)".into()),
    ];
    for member in &m.members {
        needed.push((
            top_level(Path::new(member)),
            format!("workspace member {member} ([workspace] members in Cargo.toml)"),
        ));
    }
    for t in &m.target_roots {
        needed.push((t.clone(), "a target directory named in Cargo.toml".into()));
    }
    let manifest_only = needed.clone();
    for (dir, at) in compile_time_reads(&m.members) {
        let more = match at.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        needed.push((dir, format!("read at compile time by {}{more}", at[0])));
    }
    assert!(
        needed.iter().any(|(d, _)| d == "schemas"),
        "expected src/encode/avro.rs to include_str! the schemas/*.avsc files; the scan found {:?}",
        needed
    );
    let builder = df
        .stage_running(&["cargo build", "--release"])
        .expect("no stage runs `cargo build --release`");
    let eff = df.effective(builder);
    let build_dir = eff[run_at(&eff, &["cargo build"]).expect("build RUN")]
        .1
        .clone();
    let mut missing = Vec::new();
    for (path, why) in &needed {
        if let Err(e) = copied_at(&eff, path, &build_dir, &ignore) {
            missing.push(format!("{path} ({why}): {e}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the builder stage of docker/Dockerfile cannot build the workspace:\n  {}",
        missing.join("\n  ")
    );
    // The planner reads every manifest and target too (cargo chef prepare loads the workspace).
    if let Some(planner) = df.stage_running(&["cargo chef prepare"]) {
        let eff = df.effective(planner);
        let dir = eff[run_at(&eff, &["cargo chef prepare"]).expect("prepare RUN")]
            .1
            .clone();
        let missing: Vec<String> = manifest_only
            .iter()
            .filter_map(|(path, why)| {
                copied_at(&eff, path, &dir, &ignore)
                    .err()
                    .map(|e| format!("{path} ({why}): {e}"))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "the planner stage cannot load the workspace:\n  {}",
            missing.join("\n  ")
        );
    }
}

#[test]
fn dockerfile_installs_what_the_native_dependencies_need() {
    let df = dockerfile();
    let m = manifest();
    let builder = df
        .stage_running(&["cargo build", "--release"])
        .expect("no stage runs `cargo build --release`");
    let installs: String = df
        .effective(builder)
        .iter()
        .filter(|(i, _)| i.op == "RUN" && i.args.contains("apt-get install"))
        .map(|(i, _)| i.args.clone())
        .collect::<Vec<_>>()
        .join(" ");
    let has = |pkg: &str| installs.split_whitespace().any(|w| w == pkg);
    if m.rdkafka_features.iter().any(|f| f.starts_with("ssl")) {
        for pkg in ["libssl-dev", "pkg-config"] {
            assert!(
                has(pkg),
                "rdkafka has the ssl feature: the builder must apt-get install {pkg}"
            );
        }
        let runtime = df.stages.last().expect("a stage");
        let base = &runtime.base;
        let runtime_ssl = runtime.instrs.iter().any(|i| {
            i.op == "RUN" && i.args.contains("apt-get install") && i.args.contains("libssl3")
        }) || base.contains("distroless/cc")
            || base.contains("distroless/base");
        assert!(
            runtime_ssl,
            "rdkafka links OpenSSL: the runtime image ({base}) must have libssl3"
        );
    }
    if m.rdkafka_features
        .iter()
        .any(|f| f == "cmake-build" || f == "cmake_build")
    {
        assert!(
            has("cmake"),
            "rdkafka's cmake-build feature is on: install cmake"
        );
    }
    assert!(
        has("build-essential") || (has("gcc") && has("make")),
        "librdkafka, zstd and mimalloc are C: the builder needs a C compiler and make"
    );
    assert!(
        installs.contains("--no-install-recommends"),
        "apt-get install without --no-install-recommends pulls in far more than needed"
    );
}

#[test]
fn dockerfile_runtime_stage_is_small_non_root_and_health_checked() {
    let df = dockerfile();
    let runtime = df.stages.last().expect("a stage");
    assert!(
        runtime.base.starts_with("debian:") && runtime.base.contains("slim")
            || runtime.base.starts_with("gcr.io/distroless/"),
        "the runtime stage should be a small image (debian:*-slim or distroless), not {}",
        runtime.base
    );
    let last = |op: &str| {
        runtime
            .instrs
            .iter()
            .rev()
            .find(|i| i.op == op)
            .unwrap_or_else(|| panic!("the runtime stage has no {op}"))
    };

    // User.
    let user = last("USER").args.clone();
    let name = user.split(':').next().unwrap_or_default();
    assert!(
        name != "root" && name != "0" && !name.is_empty(),
        "the runtime stage must not run as root (USER {user})"
    );
    let uid_ok = name == "10001"
        || runtime
            .instrs
            .iter()
            .any(|i| i.op == "RUN" && i.args.contains("--uid 10001") && i.args.contains(name));
    assert!(uid_ok, "USER {user}: the service user should be uid 10001");

    // The binary, from the builder.
    let builder = df
        .stage_running(&["cargo build", "--release"])
        .expect("a build stage");
    let builder_name = df.stages[builder].name.clone().unwrap_or_default();
    let binary = runtime
        .instrs
        .iter()
        .filter(|i| i.op == "COPY")
        .map(|i| parse_copy(&i.args))
        .find(|c| {
            c.from.as_deref() == Some(builder_name.as_str())
                && c.sources.iter().any(|s| s.ends_with("release/taskstream"))
        })
        .expect("the runtime stage does not COPY --from=<builder> the release binary");
    let on_path = ["/usr/local/bin", "/usr/bin", "/bin"].iter().any(|d| {
        resolve("/", &binary.dest) == *d || resolve("/", &binary.dest) == format!("{d}/taskstream")
    });
    assert!(
        on_path,
        "the binary goes to {}, not on PATH, but ENTRYPOINT runs `taskstream`",
        binary.dest
    );

    // Config, entrypoint, command.
    let config_copied = runtime
        .instrs
        .iter()
        .filter(|i| i.op == "COPY")
        .map(|i| parse_copy(&i.args))
        .any(|c| {
            c.from.is_none()
                && c.sources.iter().any(|s| trim_path(s) == SHIPPED_CONFIG)
                && resolve("/", &c.dest) == IMAGE_CONFIG
        });
    assert!(
        config_copied,
        "the runtime stage must COPY {SHIPPED_CONFIG} to {IMAGE_CONFIG}"
    );
    assert_eq!(
        exec_form(&last("ENTRYPOINT").args),
        vec!["taskstream".to_string()],
        "ENTRYPOINT should be [\"taskstream\"]"
    );
    assert_eq!(
        exec_form(&last("CMD").args),
        vec!["run", "--config", IMAGE_CONFIG],
        "CMD should run the connector with the copied config file"
    );

    // Ports, volume, healthcheck.
    let exposed: Vec<String> = runtime
        .instrs
        .iter()
        .filter(|i| i.op == "EXPOSE")
        .flat_map(|i| words(&i.args))
        .collect();
    assert!(
        exposed
            .iter()
            .any(|p| p.split('/').next() == Some(&METRICS_PORT.to_string())),
        "the runtime stage must EXPOSE {METRICS_PORT} (metrics and health); it exposes {exposed:?}"
    );
    let volume = last("VOLUME").args.clone();
    assert!(
        volume.contains("/var/lib/taskstream"),
        "VOLUME {volume}: the state directory /var/lib/taskstream must be a volume"
    );
    let hc = last("HEALTHCHECK").args.clone();
    let cmd_at = hc
        .find("CMD")
        .unwrap_or_else(|| panic!("HEALTHCHECK {hc} has no CMD"));
    let argv = exec_form(hc[cmd_at + 3..].trim());
    let joined = argv.join(" ");
    assert!(
        joined.contains(&format!("127.0.0.1:{METRICS_PORT}/health/ready"))
            || joined.contains(&format!("localhost:{METRICS_PORT}/health/ready")),
        "the HEALTHCHECK must probe http://127.0.0.1:{METRICS_PORT}/health/ready, not {joined:?}"
    );
    assert!(
        sources_mention(&[root().join("src")], "\"/health/ready\""),
        "the HEALTHCHECK probes /health/ready, but no source file under src/ routes that path"
    );
    // The program the check runs: argv[0], or the first word of a shell form's script.
    let program = if argv.len() >= 3 && argv[0].ends_with("sh") && argv[1] == "-c" {
        argv[2]
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    } else {
        argv[0].clone()
    };
    let tool_name = program.rsplit('/').next().unwrap_or_default().to_string();
    let installed = tool_name == "taskstream"
        || runtime.instrs.iter().any(|i| {
            i.op == "RUN"
                && i.args.contains("apt-get install")
                && i.args.split_whitespace().any(|w| w == tool_name)
        });
    assert!(
        installed,
        "the HEALTHCHECK runs {tool_name:?}, which the runtime stage does not install"
    );

    // ENV: the state on the volume, the token file, metrics on every interface.
    let env: Vec<(String, String)> = runtime
        .instrs
        .iter()
        .filter(|i| i.op == "ENV")
        .flat_map(|i| env_pairs(&i.args))
        .collect();
    let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let state = get("TASKSTREAM__STATE__PATH").expect("ENV TASKSTREAM__STATE__PATH is not set");
    assert!(
        state.starts_with("/var/lib/taskstream/"),
        "TASKSTREAM__STATE__PATH={state} is not on the /var/lib/taskstream volume"
    );
    assert_eq!(
        get("TASKSTREAM__SOURCE__TOKEN_FILE").as_deref(),
        Some("/run/secrets/synaptask_api_token"),
        "the image should read the API token from the file secret /run/secrets/synaptask_api_token"
    );
    assert_eq!(
        get("TASKSTREAM__METRICS__LISTEN"),
        Some(format!("0.0.0.0:{METRICS_PORT}")),
        "metrics must listen on all interfaces of the container for the published port to work"
    );
}

#[test]
fn dockerignore_keeps_build_output_history_and_secrets_out() {
    let ignore = dockerignore(".dockerignore");
    assert!(
        !ignore.is_empty(),
        ".dockerignore at the repository root is missing or empty"
    );
    for must in ["target", ".git", "docker/synaptask_api_token"] {
        assert!(
            ignore
                .iter()
                .any(|p| p == must || p == &format!("**/{must}")),
            ".dockerignore does not exclude {must}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// compose.yaml

fn compose() -> Value {
    let text = read("docker/compose.yaml");
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("docker/compose.yaml: {e}"))
}

fn services(c: &Value) -> &Mapping {
    c.get("services")
        .and_then(Value::as_mapping)
        .expect("docker/compose.yaml has no services mapping")
}

fn service<'a>(c: &'a Value, name: &str) -> &'a Value {
    services(c).get(name).unwrap_or_else(|| {
        let names: Vec<&str> = services(c).keys().filter_map(Value::as_str).collect();
        panic!("docker/compose.yaml has no service {name:?}; it has {names:?}")
    })
}

fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's `environment`, as a map or a `KEY=VALUE` list.
fn environment(svc: &Value) -> Vec<(String, Value)> {
    match svc.get("environment") {
        None => Vec::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| (str_of(k).expect("a string key"), v.clone()))
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let s = item.as_str().expect("KEY=VALUE entries");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), Value::String(v.to_string()))
            })
            .collect(),
        Some(other) => panic!("environment must be a map or a list, not {other:?}"),
    }
}

fn env_str(svc: &Value, key: &str) -> Option<String> {
    environment(svc)
        .into_iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| str_of(&v))
}

/// `command` / `entrypoint` / healthcheck `test` as one string.
fn command_line(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(str_of)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn image_of(svc: &Value) -> String {
    svc.get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The Dockerfile a service is built from (`build.dockerfile`), if any.
fn dockerfile_of(svc: &Value) -> Option<String> {
    svc.get("build")?
        .get("dockerfile")
        .and_then(Value::as_str)
        .map(String::from)
}

/// Value of `--flag N` in a command line.
fn flag(cmd: &str, name: &str) -> Option<String> {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    w.iter()
        .position(|x| *x == name)
        .and_then(|i| w.get(i + 1))
        .map(|s| s.trim_matches('"').to_string())
        .or_else(|| {
            w.iter()
                .find_map(|x| x.strip_prefix(&format!("{name}=")))
                .map(String::from)
        })
}

/// `host` and `port` of `scheme://host:port/...` or `host:port`.
fn host_port(url: &str) -> (String, Option<u16>) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.split(',').next().unwrap_or(authority);
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().ok()),
        None => (authority.to_string(), None),
    }
}

#[test]
fn compose_starts_the_brokers_the_collector_the_simulator_and_taskstream() {
    let c = compose();

    let kafka = service(&c, "kafka");
    assert!(
        image_of(kafka).starts_with("apache/kafka:"),
        "kafka should run the official apache/kafka image, not {:?}",
        image_of(kafka)
    );
    let roles = env_str(kafka, "KAFKA_PROCESS_ROLES")
        .expect("kafka has no KAFKA_PROCESS_ROLES: without it the image is not in KRaft mode");
    assert!(
        roles.contains("broker") && roles.contains("controller"),
        "KAFKA_PROCESS_ROLES={roles}: a single KRaft node is both broker and controller"
    );
    assert!(
        env_str(kafka, "KAFKA_CONTROLLER_QUORUM_VOTERS").is_some(),
        "kafka in KRaft mode needs KAFKA_CONTROLLER_QUORUM_VOTERS"
    );
    assert!(
        !services(&c).keys().any(|k| k.as_str() == Some("zookeeper")),
        "KRaft needs no zookeeper service"
    );

    let registry = service(&c, "schema-registry");
    assert!(
        image_of(registry).starts_with("confluentinc/cp-schema-registry:"),
        "schema-registry should run confluentinc/cp-schema-registry, not {:?}",
        image_of(registry)
    );

    let nats = service(&c, "nats");
    assert!(
        image_of(nats).starts_with("nats:"),
        "nats should run the official nats image, not {:?}",
        image_of(nats)
    );
    let nats_cmd = command_line(nats.get("command"));
    assert!(
        nats_cmd
            .split_whitespace()
            .any(|w| w == "-js" || w == "--jetstream"),
        "nats must be started with -js (JetStream), its command is {nats_cmd:?}"
    );

    let otel = service(&c, "otel-collector");
    let inline = otel
        .get("build")
        .and_then(|b| b.get("dockerfile_inline"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        image_of(otel).starts_with("otel/opentelemetry-collector")
            || inline.contains("otel/opentelemetry-collector"),
        "otel-collector should run (or be built FROM) an otel/opentelemetry-collector image"
    );
    let otel_cmd = command_line(otel.get("command"));
    let config_path = flag(&otel_cmd, "--config")
        .unwrap_or_else(|| panic!("otel-collector's command {otel_cmd:?} names no --config"));
    let mounts: Vec<String> = otel
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|v| v.iter().filter_map(str_of).collect())
        .unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./otel-collector.yaml:")
                && m.split(':').nth(1) == Some(config_path.as_str())),
        "otel-collector must mount ./otel-collector.yaml at {config_path} (its --config); \
         mounts: {mounts:?}"
    );

    let sim = service(&c, "synaptask-sim");
    let sim_cmd = format!(
        "{} {}",
        command_line(sim.get("entrypoint")),
        command_line(sim.get("command"))
    );
    assert!(
        sim_cmd.contains("taskstream sim "),
        "synaptask-sim must run `taskstream sim`; it runs {sim_cmd:?}"
    );
    assert_eq!(
        flag(&sim_cmd, "--bind").as_deref(),
        Some("0.0.0.0"),
        "the simulator must --bind 0.0.0.0 to be reachable from the taskstream container"
    );

    let ts = service(&c, "taskstream");
    assert_eq!(
        dockerfile_of(ts).as_deref(),
        Some("docker/Dockerfile"),
        "taskstream must be built from docker/Dockerfile"
    );
    assert_eq!(
        ts.get("build")
            .and_then(|b| b.get("context"))
            .and_then(Value::as_str),
        Some(".."),
        "taskstream's build context must be the repository root (..), where the workspace is"
    );
    assert!(
        image_of(sim) == image_of(ts) || dockerfile_of(sim).as_deref() == Some("docker/Dockerfile"),
        "synaptask-sim should run the taskstream image"
    );
}

#[test]
fn compose_header_says_how_to_run_it_and_that_it_was_not_run_here() {
    let text = read("docker/compose.yaml");
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#') || l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        header.contains("docker compose -f docker/compose.yaml up"),
        "the header comment of docker/compose.yaml must say how to run it"
    );
    assert!(
        header.contains("NOT RUN") || header.contains("not run"),
        "the header comment must say the file was not run on the development machine"
    );
}

#[test]
fn every_compose_service_has_a_healthcheck() {
    let c = compose();
    let mut missing = Vec::new();
    for (name, svc) in services(&c) {
        let name = name.as_str().unwrap_or_default();
        let hc = svc.get("healthcheck");
        let disabled = hc
            .and_then(|h| h.get("disable"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let test = command_line(hc.and_then(|h| h.get("test")));
        if hc.is_none() || disabled || test.is_empty() || test == "NONE" {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "these services have no (enabled) healthcheck, so depends_on service_healthy cannot \
         wait for them: {missing:?}"
    );
    let sim = service(&c, "synaptask-sim");
    let sim_test = command_line(sim.get("healthcheck").and_then(|h| h.get("test")));
    let sim_path = sim_test
        .split_whitespace()
        .find_map(|w| w.split_once("://").map(|(_, rest)| rest))
        .and_then(|rest| rest.find('/').map(|i| rest[i..].to_string()))
        .unwrap_or_else(|| panic!("synaptask-sim's healthcheck {sim_test:?} probes no URL"));
    assert!(
        sources_mention(&[root().join("sim/src")], &format!("\"{sim_path}\"")),
        "synaptask-sim's healthcheck probes {sim_path}, which the simulator (sim/src) does not serve"
    );
    let ts = service(&c, "taskstream");
    let test = command_line(ts.get("healthcheck").and_then(|h| h.get("test")));
    assert!(
        test.contains(&format!(":{METRICS_PORT}/health/ready")),
        "taskstream's healthcheck must probe /health/ready on {METRICS_PORT}, not {test:?}"
    );
}

#[test]
fn taskstream_waits_for_healthy_dependencies() {
    let c = compose();
    let ts = service(&c, "taskstream");
    let deps = ts
        .get("depends_on")
        .and_then(Value::as_mapping)
        .expect("taskstream's depends_on must be a map with conditions (service_healthy)");
    for (name, dep) in deps {
        let name = name.as_str().unwrap_or_default();
        assert_eq!(
            dep.get("condition").and_then(Value::as_str),
            Some("service_healthy"),
            "taskstream depends on {name} without condition: service_healthy, so it may start \
             before {name} accepts connections"
        );
        service(&c, name);
    }
    for want in [
        "kafka",
        "schema-registry",
        "nats",
        "otel-collector",
        "synaptask-sim",
    ] {
        assert!(
            deps.contains_key(want),
            "taskstream does not depend on {want}"
        );
    }
}

#[test]
fn published_ports_are_bound_to_localhost() {
    let c = compose();
    let mut open = Vec::new();
    for (name, svc) in services(&c) {
        let name = name.as_str().unwrap_or_default();
        let Some(ports) = svc.get("ports").and_then(Value::as_sequence) else {
            continue;
        };
        for p in ports {
            let bound = match p {
                Value::String(s) => s.starts_with("127.0.0.1:"),
                Value::Mapping(m) => m.get("host_ip").and_then(Value::as_str) == Some("127.0.0.1"),
                _ => false,
            };
            if !bound {
                open.push(format!("{name}: {p:?}"));
            }
        }
    }
    assert!(
        open.is_empty(),
        "published ports must be bound to 127.0.0.1 (\"127.0.0.1:HOST:CONTAINER\"), these listen \
         on every interface of the host: {open:?}"
    );
    let ts = service(&c, "taskstream");
    let ports: Vec<String> = ts
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|v| v.iter().filter_map(str_of).collect())
        .unwrap_or_default();
    assert!(
        ports.contains(&format!("127.0.0.1:{METRICS_PORT}:{METRICS_PORT}")),
        "taskstream should publish its metrics port as 127.0.0.1:{METRICS_PORT}:{METRICS_PORT}, \
         it publishes {ports:?}"
    );
}

#[test]
fn compose_environment_values_are_strings_or_numbers() {
    // Compose rejects (older versions) or rewrites booleans in `environment`; quote them.
    let c = compose();
    for (name, svc) in services(&c) {
        for (k, v) in environment(svc) {
            assert!(
                matches!(v, Value::String(_) | Value::Number(_)),
                "service {:?}: environment {k} is {v:?}; quote it (\"true\")",
                name.as_str().unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_token_is_a_compose_secret_shared_with_the_simulator() {
    let c = compose();
    let defined = c
        .get("secrets")
        .and_then(Value::as_mapping)
        .expect("docker/compose.yaml defines no top-level secrets");
    let secret_names = |svc: &Value| -> Vec<String> {
        svc.get("secrets")
            .and_then(Value::as_sequence)
            .map(|v| {
                v.iter()
                    .filter_map(|s| str_of(s).or_else(|| s.get("source").and_then(str_of)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let ts = service(&c, "taskstream");
    let file = env_str(ts, "TASKSTREAM__SOURCE__TOKEN_FILE")
        .or_else(|| dockerfile_env("TASKSTREAM__SOURCE__TOKEN_FILE"))
        .expect("taskstream reads the token from no file (TASKSTREAM__SOURCE__TOKEN_FILE)");
    let secret = file
        .strip_prefix("/run/secrets/")
        .unwrap_or_else(|| panic!("the token file {file} is not a secret under /run/secrets/"));
    assert!(
        secret_names(ts).iter().any(|s| s == secret),
        "taskstream reads {file} but does not list the secret {secret}"
    );
    assert!(
        defined
            .get(secret)
            .and_then(|s| s.get("file"))
            .and_then(Value::as_str)
            .is_some(),
        "the secret {secret} is not defined with a file under the top-level secrets"
    );
    for (k, v) in environment(ts) {
        assert!(
            !k.contains("TOKEN") || k.ends_with("TOKEN_FILE") || k.ends_with("TOKEN_ENV"),
            "{k}={v:?}: tokens go in the secret file, not in the environment"
        );
    }
    let sim = service(&c, "synaptask-sim");
    assert!(
        secret_names(sim).iter().any(|s| s == secret),
        "synaptask-sim must mount the secret {secret} to accept the token taskstream sends"
    );
    let cmd = command_line(sim.get("command"));
    assert!(
        cmd.contains(&file),
        "synaptask-sim must build its --tokens from {file}, so it accepts taskstream's token"
    );
}

// ---------------------------------------------------------------------------------------------
// TASKSTREAM__* keys, loaded by taskstream's own config loader

/// The `ENV TASKSTREAM__*` pairs of the runtime stage.
fn dockerfile_envs() -> Vec<(String, String)> {
    let df = dockerfile();
    let runtime = df.stages.last().expect("a stage");
    runtime
        .instrs
        .iter()
        .filter(|i| i.op == "ENV")
        .flat_map(|i| env_pairs(&i.args))
        .filter(|(k, _)| k.starts_with("TASKSTREAM__"))
        .collect()
}

fn dockerfile_env(key: &str) -> Option<String> {
    dockerfile_envs()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// What the connector container sees: the image's ENV, then compose's `environment`.
fn container_envs(c: &Value, service_name: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = dockerfile_envs()
        .into_iter()
        .map(|(k, v)| (k, v, "docker/Dockerfile ENV".to_string()))
        .collect();
    for (k, v) in environment(service(c, service_name)) {
        if !k.starts_with("TASKSTREAM__") {
            continue;
        }
        let v = str_of(&v).unwrap_or_default();
        out.retain(|(key, _, _)| *key != k);
        out.push((k, v, format!("compose service {service_name}")));
    }
    out
}

/// The config as the container loads it ([`Config::load`]: the shipped file, then the
/// `TASKSTREAM__*` variables, then the cross-field validation), with these variables set.
fn load_with(vars: &[(String, String)]) -> Result<Config, String> {
    in_jail(vars, || {
        Config::load(Some(&root().join(SHIPPED_CONFIG))).map_err(|e| e.to_string())
    })
}

/// Only the parse of the same sources: unknown keys and mistyped values, without the
/// cross-field checks (a single `sinks.kafka.format = avro` is fine once the registry URL is
/// set by another variable).
fn parse_with(vars: &[(String, String)]) -> Result<Config, String> {
    in_jail(vars, || {
        Figment::new()
            .merge(Toml::file_exact(root().join(SHIPPED_CONFIG)))
            .merge(Env::prefixed("TASKSTREAM__").split("__"))
            .extract::<Config>()
            .map_err(|e| {
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
    })
}

/// Runs `f` with exactly these extra environment variables set (figment's Jail restores the
/// environment afterwards and serialises the tests that use it).
// figment's Jail closure must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
fn in_jail<T>(vars: &[(String, String)], f: impl FnOnce() -> T) -> T {
    let mut out = None;
    figment::Jail::expect_with(|jail| {
        for (k, v) in vars {
            jail.set_env(k, v);
        }
        out = Some(f());
        Ok(())
    });
    out.expect("the jail ran")
}

#[test]
fn every_taskstream_variable_is_a_real_config_key_with_a_valid_value() {
    let c = compose();
    let mut all: Vec<(String, String, String)> = dockerfile_envs()
        .into_iter()
        .map(|(k, v)| (k, v, "docker/Dockerfile ENV".to_string()))
        .collect();
    for (name, svc) in services(&c) {
        let name = name.as_str().unwrap_or_default();
        for (k, v) in environment(svc) {
            if k.starts_with("TASKSTREAM__") {
                all.push((
                    k,
                    str_of(&v).unwrap_or_default(),
                    format!("compose service {name}"),
                ));
            }
        }
    }
    assert!(
        all.len() >= 5,
        "expected the container files to set TASKSTREAM__* keys; found {all:?}"
    );
    let mut bad = Vec::new();
    for (k, v, from) in &all {
        if let Err(e) = parse_with(&[(k.clone(), v.clone())]) {
            bad.push(format!("{from}: {k}={v:?}: {e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "these variables are not config keys, or their values do not parse (see \
         config/taskstream.toml for the keys):\n  {}",
        bad.join("\n  ")
    );
    // Each service that sets any, with the image's ENV under it, loads and validates whole.
    for (name, svc) in services(&c) {
        let name = name.as_str().unwrap_or_default();
        if !environment(svc)
            .iter()
            .any(|(k, _)| k.starts_with("TASKSTREAM__"))
        {
            continue;
        }
        let vars: Vec<(String, String)> = container_envs(&c, name)
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        if let Err(e) = load_with(&vars) {
            panic!("compose service {name}: the configuration does not load: {e}\n{vars:?}");
        }
    }
}

#[test]
fn the_connector_containers_config_points_at_the_compose_services() {
    let c = compose();
    let envs = container_envs(&c, "taskstream");
    let vars: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    let cfg = load_with(&vars).unwrap_or_else(|e| {
        panic!("the connector container's configuration does not load: {e}\nvariables: {vars:?}")
    });
    let service_names: Vec<String> = services(&c).keys().filter_map(str_of).collect();
    let points_at = |what: &str, url: &str, svc: &str| {
        let (host, port) = host_port(url);
        assert_eq!(
            host, svc,
            "{what} = {url} should point at the compose service {svc} (services: {service_names:?})"
        );
        port
    };

    // Sinks.
    assert!(
        cfg.sinks.kafka.enabled,
        "the Kafka sink is not enabled in the container"
    );
    assert!(
        cfg.sinks.nats.enabled,
        "the NATS sink is not enabled in the container"
    );
    assert_eq!(
        cfg.sinks.nats.mode,
        NatsMode::JetStream,
        "the NATS sink should publish to JetStream"
    );
    points_at("sinks.kafka.brokers", &cfg.sinks.kafka.brokers, "kafka");
    points_at("sinks.nats.url", &cfg.sinks.nats.url, "nats");
    if cfg.format_of(&cfg.sinks.kafka) == BodyFormat::Avro || cfg.avro_needed() {
        let url = cfg
            .schema_registry
            .url
            .clone()
            .expect("Avro without a registry URL");
        points_at("schema_registry.url", &url, "schema-registry");
    }

    // Source and jobs: the simulator's ports.
    let sim_cmd = command_line(service(&c, "synaptask-sim").get("command"));
    let sim_port: u16 = flag(&sim_cmd, "--port")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("synaptask-sim's command {sim_cmd:?} sets no --port"));
    assert_eq!(
        points_at("source.url", &cfg.source.url, "synaptask-sim"),
        Some(sim_port),
        "source.url = {} does not use the simulator's --port {sim_port}",
        cfg.source.url
    );
    if cfg.jobs.enabled {
        let jobs_port: Option<u16> = flag(&sim_cmd, "--jobs-port").and_then(|p| p.parse().ok());
        assert_eq!(
            points_at("jobs.url", &cfg.jobs.url, "synaptask-sim"),
            jobs_port,
            "jobs.url = {} does not use the simulator's --jobs-port",
            cfg.jobs.url
        );
    }

    // Telemetry: the collector's OTLP/HTTP receiver.
    let otlp = cfg
        .telemetry
        .otlp_endpoint
        .clone()
        .expect("telemetry.otlp_endpoint is not set: no traces reach the collector");
    let otlp_port = points_at("telemetry.otlp_endpoint", &otlp, "otel-collector");
    let receiver = otel_config()["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| "localhost:4318".into());
    assert_eq!(
        otlp_port,
        host_port(&receiver).1,
        "telemetry.otlp_endpoint = {otlp} does not use the collector's OTLP/HTTP port ({receiver})"
    );

    // Metrics, state, token.
    let listen = cfg
        .metrics
        .listen
        .clone()
        .expect("metrics.listen is not set");
    assert_eq!(
        listen,
        format!("0.0.0.0:{METRICS_PORT}"),
        "metrics must listen on 0.0.0.0:{METRICS_PORT} inside the container (published and \
         health-checked there)"
    );
    let state = cfg
        .state
        .path
        .clone()
        .expect("state.path is not set: every restart would be a first start");
    let volumes: Vec<String> = service(&c, "taskstream")
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|v| v.iter().filter_map(str_of).collect())
        .unwrap_or_default();
    let named = c.get("volumes").and_then(Value::as_mapping);
    let on_volume = volumes.iter().any(|m| {
        let mut parts = m.split(':');
        let (src, dst) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        state.starts_with(dst) && named.is_some_and(|n| n.contains_key(src))
    });
    assert!(
        on_volume,
        "state.path = {} is not on a named volume of the taskstream service ({volumes:?})",
        state.display()
    );
    let token_file = cfg
        .source
        .token_file
        .clone()
        .expect("source.token_file is not set");
    assert!(
        token_file.starts_with("/run/secrets/"),
        "source.token_file = {} is not a mounted secret",
        token_file.display()
    );
    if cfg.jobs.enabled {
        assert_eq!(
            cfg.jobs.token_file.as_ref(),
            Some(&token_file),
            "the simulator's job API accepts the same token: jobs.token_file should be the \
             same secret"
        );
    }
    assert_eq!(
        cfg.telemetry.log_format,
        taskstream::telemetry::LogFormat::Json,
        "container logs should be JSON lines (telemetry.log_format = json)"
    );
}

// ---------------------------------------------------------------------------------------------
// otel-collector.yaml

fn otel_config() -> Value {
    let text = read("docker/otel-collector.yaml");
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("docker/otel-collector.yaml: {e}"))
}

#[test]
fn the_collector_receives_otlp_over_http_and_answers_its_healthcheck() {
    let cfg = otel_config();
    let http = &cfg["receivers"]["otlp"]["protocols"]["http"];
    assert!(
        !http.is_null(),
        "docker/otel-collector.yaml has no receivers.otlp.protocols.http"
    );
    let endpoint = http["endpoint"].as_str().unwrap_or("localhost:4318");
    let (host, port) = host_port(endpoint);
    assert!(
        host == "0.0.0.0" || host.is_empty(),
        "the OTLP/HTTP receiver listens on {endpoint}: other containers cannot reach it; use \
         0.0.0.0:4318"
    );
    assert_eq!(
        port,
        Some(4318),
        "the OTLP/HTTP receiver should use port 4318"
    );
    let pipeline = &cfg["service"]["pipelines"]["traces"];
    let names = |v: &Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| s.iter().filter_map(str_of).collect())
            .unwrap_or_default()
    };
    assert!(
        names(&pipeline["receivers"]).iter().any(|r| r == "otlp"),
        "the traces pipeline does not take the otlp receiver"
    );
    for exporter in names(&pipeline["exporters"]) {
        assert!(
            cfg["exporters"].get(exporter.as_str()).is_some(),
            "the traces pipeline uses exporter {exporter}, which is not defined under exporters"
        );
    }
    assert!(
        !names(&pipeline["exporters"]).is_empty(),
        "the traces pipeline has no exporter"
    );
    // The compose healthcheck probes the health_check extension.
    let c = compose();
    let test = command_line(
        service(&c, "otel-collector")
            .get("healthcheck")
            .and_then(|h| h.get("test")),
    );
    if test.contains(":13133") {
        assert!(
            names(&cfg["service"]["extensions"])
                .iter()
                .any(|e| e == "health_check"),
            "the compose healthcheck probes :13133 but the health_check extension is not enabled"
        );
        let ext = cfg["extensions"]["health_check"]["endpoint"]
            .as_str()
            .unwrap_or("localhost:13133");
        assert_eq!(
            host_port(ext).1,
            Some(13133),
            "the health_check extension listens on {ext}, not 13133"
        );
    }
}
