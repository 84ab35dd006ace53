//! The Kafka and NATS sinks against real brokers from `support`: topic / stream creation,
//! round trips checked field by field, broker crashes in the middle of a stream (every ack
//! must resolve Ok and nothing may be lost), JetStream de-duplication, and a throughput
//! measurement that is printed, not asserted.
//!
//! The tests take a shared lock so they run one at a time: they kill brokers and measure
//! throughput, and on a two-core machine parallel runs would only measure each other.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use async_nats::jetstream::{self, consumer::pull};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use support::{Nats, Tansu};
use taskstream::metrics;
use taskstream::sink::kafka::{KafkaConfig, KafkaSink, KafkaTopics};
use taskstream::sink::nats::{NatsConfig, NatsMode, NatsSink};
use taskstream::sink::{AckFuture, Message, Route, Sink};

/// Upper bound on any single test.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Every ack of a batch must resolve within this.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Acks must resolve within this after a broker restart.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);
/// Acks awaited at most at once, like the delivery window.
const WINDOW: usize = 10_000;
const THROUGHPUT_MESSAGES: usize = 100_000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a test body alone and within [`TEST_TIMEOUT`].
async fn run<F: std::future::Future<Output = anyhow::Result<()>>>(body: F) -> anyhow::Result<()> {
    let _alone = SERIAL.lock().await;
    // RUST_LOG=taskstream=info shows the sinks' recovery logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .context("test timed out")?
}

/// A record-like message: `n` picks the key and version, so per-key order is checkable.
fn message(route: Route, event: &str, n: usize, keys: usize, payload_len: usize) -> Message {
    let key = format!("k{}", n % keys);
    let version = n / keys + 1;
    let id = format!("{}:{key}:{version}", route_name(route));
    let body = format!(r#"{{"id":"{id}","version":{version},"pad":""}}"#);
    let pad = payload_len.saturating_sub(body.len());
    let payload = format!(
        r#"{{"id":"{id}","version":{version},"pad":"{}"}}"#,
        "x".repeat(pad)
    );
    Message {
        avro: None,
        avro_key: None,
        route,
        event: event.into(),
        id: id.clone(),
        key,
        payload: Some(payload.into_bytes()),
        headers: vec![
            ("ce_id", id),
            (
                "ce_type",
                format!("space.synaptask.{}.{event}", route_name(route)),
            ),
            ("content-type", "application/json".into()),
            ("trace_id", format!("{n:032x}")),
        ],
    }
}

fn route_name(route: Route) -> &'static str {
    match route {
        Route::Nodes => "node",
        Route::Links => "link",
        Route::Status => "status",
        Route::DeadLetter => "dlq",
        Route::Jobs => "job",
        Route::History => "history",
    }
}

/// 1000 messages over every route, with one tombstone (a deleted node) in the middle.
fn mixed_batch(count: usize) -> Vec<Arc<Message>> {
    let routes = [
        (Route::Nodes, "updated"),
        (Route::Links, "created"),
        (Route::Status, "status_changed"),
        (Route::DeadLetter, "dead_letter"),
        (Route::Jobs, "job_done"),
        (Route::History, "batch"),
    ];
    let mut out: Vec<Arc<Message>> = (0..count)
        .map(|n| {
            let (route, event) = routes[n % routes.len()];
            Arc::new(message(route, event, n, 40, 200))
        })
        .collect();
    let mut tombstone = message(Route::Nodes, "deleted", 0, 40, 0);
    tombstone.id = "node:k0:tombstone".into();
    tombstone.headers[0].1 = tombstone.id.clone();
    tombstone.payload = None;
    out[count / 2] = Arc::new(tombstone);
    out
}

/// Enqueues in order with at most [`WINDOW`] unresolved acks, then waits for every ack; fails
/// on the first error or when `bound` passes.
async fn publish_all(
    sink: &dyn Sink,
    msgs: &[Arc<Message>],
    bound: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let work = async {
        let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        for msg in msgs {
            while acks.len() >= WINDOW {
                acks.next().await.context("ack stream ended")??;
            }
            // Retryable enqueue errors (a full client buffer, a reconnect) are retried in
            // order with backoff, as the delivery window does.
            let mut backoff = Duration::from_millis(10);
            let ack = loop {
                match sink.enqueue(msg.clone()).await {
                    Ok(ack) => break ack,
                    Err(e) if e.is_retryable() => {
                        eprintln!("enqueue {}: {e}; retrying in {backoff:?}", msg.id);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            acks.push(ack);
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(bound, work)
        .await
        .with_context(|| format!("acks not resolved within {bound:?}"))??;
    Ok(started.elapsed())
}

fn kafka_config(tansu: &Tansu) -> KafkaConfig {
    KafkaConfig {
        enabled: true,
        brokers: tansu.bootstrap(),
        ..KafkaConfig::default()
    }
}

/// Reads every topic from the beginning until `want` messages arrived (or `bound` passed).
async fn consume_kafka(
    tansu: &Tansu,
    topics: &KafkaTopics,
    want: usize,
    bound: Duration,
) -> anyhow::Result<Vec<Consumed>> {
    let consumer: StreamConsumer = tansu
        .client_config()
        .set("group.id", format!("sinks-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in [
        &topics.nodes,
        &topics.links,
        &topics.status,
        &topics.dlq,
        &topics.jobs,
        &topics.history,
    ] {
        for partition in 0..3 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + bound;
    let mut out = Vec::new();
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let m = next?;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Consumed {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    Ok(out)
}

struct Consumed {
    topic: String,
    partition: i32,
    key: Option<String>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
}

fn ce_id(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(k, _)| k == "ce_id")
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_creates_topics_and_round_trips_every_field() -> anyhow::Result<()> {
    run(async {
        let tansu = Tansu::start().await;
        let cfg = kafka_config(&tansu);
        // Without permission to create topics, missing ones are a configuration error.
        let strict = KafkaSink::new(&KafkaConfig {
            create_topics: false,
            ..cfg.clone()
        })?;
        let refused = tokio::time::timeout(Duration::from_secs(30), strict.prepare()).await?;
        ensure!(
            matches!(&refused, Err(e) if !e.is_retryable()),
            "{refused:?}"
        );
        drop(strict);

        let sink = KafkaSink::new(&cfg)?;
        let ready = tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
        eprintln!("prepare: {ready}");
        ensure!(ready.contains("6 topics ready"), "{ready}");
        for topic in [
            &cfg.topics.nodes,
            &cfg.topics.links,
            &cfg.topics.status,
            &cfg.topics.dlq,
            &cfg.topics.jobs,
            &cfg.topics.history,
        ] {
            ensure!(
                tansu.partition_count(topic).await == Some(3),
                "topic {topic} missing or wrong partitions"
            );
        }
        check_cleanup_policies(&tansu, &cfg.topics).await?;
        // A second prepare finds everything in place.
        tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;

        let sent = mixed_batch(1000);
        publish_all(&sink, &sent, ACK_TIMEOUT).await?;
        tokio::time::timeout(Duration::from_secs(10), sink.flush()).await??;

        let got = consume_kafka(&tansu, &cfg.topics, sent.len(), Duration::from_secs(60)).await?;
        ensure!(
            got.len() == sent.len(),
            "consumed {} of {}",
            got.len(),
            sent.len()
        );
        let by_id: HashMap<&str, &Arc<Message>> = sent.iter().map(|m| (m.id.as_str(), m)).collect();
        let mut last_seen: HashMap<(String, String), usize> = HashMap::new();
        let position: HashMap<&str, usize> = sent
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.as_str(), i))
            .collect();
        let mut tombstones = 0;
        for c in &got {
            let id = ce_id(&c.headers).context("no ce_id header")?;
            let m = by_id
                .get(id)
                .with_context(|| format!("unexpected id {id}"))?;
            ensure!(
                c.topic == cfg.topics.topic(m.route),
                "{id} on topic {}",
                c.topic
            );
            ensure!(
                c.key.as_deref() == Some(m.key.as_str()),
                "{id}: key {:?}",
                c.key
            );
            ensure!(c.payload == m.payload, "{id}: payload differs");
            ensure!(
                c.headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v))
                    .eq(m.headers.iter().map(|(k, v)| (*k, v))),
                "{id}: headers {:?} != {:?}",
                c.headers,
                m.headers
            );
            if c.payload.is_none() {
                tombstones += 1;
            }
            // Per key (and partition), records arrive in the order they were sent.
            let at = position[id];
            if let Some(prev) = last_seen.insert((c.topic.clone(), m.key.clone()), at) {
                ensure!(
                    prev < at,
                    "{id} (sent #{at}) consumed after sent #{prev} of the same key"
                );
            }
            let _ = c.partition;
        }
        ensure!(tombstones == 1, "{tombstones} tombstones");
        let distinct: HashSet<&str> = got.iter().filter_map(|c| ce_id(&c.headers)).collect();
        ensure!(
            distinct.len() == sent.len(),
            "{} distinct ids",
            distinct.len()
        );

        // A message the broker can never take is a fatal error, not an endless retry.
        let mut huge = message(Route::Nodes, "updated", 1, 40, 0);
        huge.payload = Some(vec![b'x'; 2_000_000]);
        let outcome = match sink.enqueue(Arc::new(huge)).await {
            Ok(ack) => tokio::time::timeout(ACK_TIMEOUT, ack).await?,
            Err(e) => Err(e),
        };
        ensure!(
            matches!(&outcome, Err(e) if !e.is_retryable()),
            "{outcome:?}"
        );
        Ok(())
    })
    .await
}

/// Entity topics are compacted, the others not; tansu answers DescribeConfigs with what the
/// topic was created with.
async fn check_cleanup_policies(tansu: &Tansu, topics: &KafkaTopics) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = tansu.client_config().create()?;
    let names = [
        &topics.nodes,
        &topics.links,
        &topics.status,
        &topics.dlq,
        &topics.jobs,
        &topics.history,
    ];
    let specs: Vec<ResourceSpecifier<'_>> = names
        .iter()
        .map(|n| ResourceSpecifier::Topic(n.as_str()))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(
        Duration::from_secs(15),
        admin.describe_configs(specs.iter(), &options),
    )
    .await??;
    let mut policies = BTreeMap::new();
    for (name, result) in names.iter().zip(results) {
        let resource =
            result.map_err(|code| anyhow::anyhow!("describe_configs({name}): {code:?}"))?;
        let policy = resource.get("cleanup.policy").and_then(|e| e.value.clone());
        policies.insert(name.to_string(), policy);
    }
    eprintln!("cleanup.policy per topic: {policies:?}");
    for name in [&topics.nodes, &topics.links] {
        ensure!(
            policies[name.as_str()].as_deref() == Some("compact"),
            "{name}: {policies:?}"
        );
    }
    for name in [&topics.status, &topics.dlq, &topics.jobs, &topics.history] {
        ensure!(
            policies[name.as_str()].as_deref() != Some("compact"),
            "{name}: {policies:?}"
        );
    }
    Ok(())
}

/// Publishes `msgs` with every ack on its own task, recording for each message id whether its
/// ack came after `after` was set. Returns the join handles.
async fn publish_tracked(
    sink: &dyn Sink,
    msgs: &[Arc<Message>],
    after: &Arc<AtomicBool>,
    acked: &Arc<Mutex<Vec<(String, bool)>>>,
    tasks: &mut Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pause_every: Option<(usize, Duration)>,
) -> anyhow::Result<()> {
    for (i, msg) in msgs.iter().enumerate() {
        let ack = tokio::time::timeout(Duration::from_secs(30), sink.enqueue(msg.clone()))
            .await
            .context("enqueue blocked")??;
        let (after, acked, id) = (after.clone(), acked.clone(), msg.id.clone());
        tasks.push(tokio::spawn(async move {
            ack.await?;
            let late = after.load(Ordering::SeqCst);
            acked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id, late));
            Ok(())
        }));
        if let Some((every, pause)) = pause_every {
            if i % every == every - 1 {
                tokio::time::sleep(pause).await;
            }
        }
    }
    Ok(())
}

async fn await_tasks(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    bound: Duration,
) -> anyhow::Result<()> {
    let all = async {
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(bound, all)
        .await
        .with_context(|| format!("acks not all resolved within {bound:?}"))?
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_delivers_everything_across_a_broker_crash() -> anyhow::Result<()> {
    run(async {
        let mut tansu = Tansu::start().await;
        let cfg = kafka_config(&tansu);
        let sink = KafkaSink::new(&cfg)?;
        tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
        let retries_before = metrics::metrics().sink_retries_total.get();

        let msgs: Vec<Arc<Message>> = (0..900)
            .map(|n| Arc::new(message(Route::Nodes, "updated", n, 50, 300)))
            .collect();
        let restarted = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Sending at a modest pace so the crash lands mid-stream.
        publish_tracked(
            &sink,
            &msgs[..300],
            &restarted,
            &acked,
            &mut tasks,
            Some((50, Duration::from_millis(20))),
        )
        .await?;
        tansu.kill();
        let killed_at = Instant::now();
        publish_tracked(
            &sink,
            &msgs[300..600],
            &restarted,
            &acked,
            &mut tasks,
            Some((50, Duration::from_millis(50))),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Acks before this point came from the dead broker, whose memory storage is gone.
        restarted.store(true, Ordering::SeqCst);
        tansu.restart().await;
        eprintln!("tansu down for {:?}", killed_at.elapsed());
        let restarted_at = Instant::now();
        publish_tracked(&sink, &msgs[600..], &restarted, &acked, &mut tasks, None).await?;
        await_tasks(tasks, RECOVERY_TIMEOUT).await?;
        eprintln!(
            "all {} acks resolved {:?} after the restart; {} retries counted",
            msgs.len(),
            restarted_at.elapsed(),
            metrics::metrics().sink_retries_total.get() - retries_before
        );

        let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|e| e.into_inner()));
        let must_have: HashSet<String> = acked
            .iter()
            .filter(|(_, late)| *late)
            .map(|(id, _)| id.clone())
            .collect();
        ensure!(acked.len() == msgs.len(), "{} acks recorded", acked.len());
        ensure!(
            must_have.len() >= 300,
            "only {} messages were acked after the restart",
            must_have.len()
        );
        let got = consume_kafka(
            &tansu,
            &cfg.topics,
            must_have.len(),
            Duration::from_secs(60),
        )
        .await?;
        let present: HashSet<&str> = got.iter().filter_map(|c| ce_id(&c.headers)).collect();
        let lost: Vec<&String> = must_have
            .iter()
            .filter(|id| !present.contains(id.as_str()))
            .collect();
        eprintln!(
            "after restart: {} must be present, {} consumed ({} distinct)",
            must_have.len(),
            got.len(),
            present.len()
        );
        ensure!(
            lost.is_empty(),
            "{} acknowledged messages missing, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        Ok(())
    })
    .await
}

fn nats_config(nats: &Nats, mode: NatsMode) -> NatsConfig {
    NatsConfig {
        enabled: true,
        url: nats.url(),
        mode,
        ack_timeout_ms: 2_000,
        ..NatsConfig::default()
    }
}

/// Every message of the stream, through an ephemeral pull consumer.
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    bound: Duration,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let stream = js.get_stream(stream).await?;
    let total = stream.get_info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(total);
    let deadline = Instant::now() + bound;
    while out.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, messages.next()).await {
            Ok(Some(m)) => out.push(m?),
            Ok(None) => break,
            Err(_) => bail!(
                "read {} of {total} stream messages within {bound:?}",
                out.len()
            ),
        }
    }
    Ok(out)
}

fn nats_headers(m: &jetstream::Message) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(headers) = &m.headers {
        for (name, values) in headers.iter() {
            for value in values {
                out.push((name.to_string(), value.to_string()));
            }
        }
    }
    out
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_jetstream_creates_the_stream_round_trips_and_dedupes() -> anyhow::Result<()> {
    run(async {
        let nats = Nats::start().await;
        let cfg = nats_config(&nats, NatsMode::JetStream);
        let sink = NatsSink::new(&cfg)?;
        let ready = tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
        eprintln!("prepare: {ready}");
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client);
        let info = js.get_stream(&cfg.stream).await?.get_info().await?;
        eprintln!("stream subjects: {:?}", info.config.subjects);

        let sent = mixed_batch(1000);
        publish_all(&sink, &sent, ACK_TIMEOUT).await?;
        tokio::time::timeout(Duration::from_secs(10), sink.flush()).await??;

        let got = read_stream(&js, &cfg.stream, Duration::from_secs(30)).await?;
        let with_payload: Vec<&Arc<Message>> =
            sent.iter().filter(|m| m.payload.is_some()).collect();
        ensure!(
            got.len() == with_payload.len(),
            "stream has {} messages, want {}",
            got.len(),
            with_payload.len()
        );
        // One publisher awaiting enqueue in order: the stream has the same order.
        for (m, g) in with_payload.iter().zip(&got) {
            let want_subject = match m.route {
                Route::Nodes => format!("synaptask.nodes.{}", m.event),
                Route::Links => format!("synaptask.links.{}", m.event),
                Route::Jobs => format!("synaptask.jobs.{}", m.event),
                Route::History => format!("synaptask.history.{}", m.event),
                Route::Status => "synaptask.status".into(),
                Route::DeadLetter => "synaptask.dlq".into(),
            };
            ensure!(
                g.subject.as_str() == want_subject,
                "{}: subject {}",
                m.id,
                g.subject
            );
            ensure!(
                Some(g.payload.as_ref()) == m.payload.as_deref(),
                "{}: payload differs",
                m.id
            );
            let headers = nats_headers(g);
            ensure!(
                header(&headers, "Nats-Msg-Id") == Some(m.id.as_str()),
                "{}: {headers:?}",
                m.id
            );
            for (k, v) in &m.headers {
                ensure!(
                    header(&headers, k) == Some(v.as_str()),
                    "{}: header {k} in {headers:?}",
                    m.id
                );
            }
        }

        // The same record id twice is stored once (a new id: the batch has no Nodes n = 7).
        let count = |js: jetstream::Context, stream: String| async move {
            anyhow::Ok(
                js.get_stream(stream)
                    .await?
                    .get_info()
                    .await?
                    .state
                    .messages,
            )
        };
        let before = count(js.clone(), cfg.stream.clone()).await?;
        let dup = Arc::new(message(Route::Nodes, "updated", 7, 40, 200));
        ensure!(
            !sent.iter().any(|m| m.id == dup.id),
            "{} is not new",
            dup.id
        );
        publish_all(&sink, &[dup.clone(), dup.clone()], ACK_TIMEOUT).await?;
        publish_all(&sink, &[dup], ACK_TIMEOUT).await?;
        let after = count(js.clone(), cfg.stream.clone()).await?;
        ensure!(
            after == before + 1,
            "one id published three times: {before} -> {after} messages"
        );

        // A message the broker can never take is a fatal error, not an endless retry.
        let mut huge = message(Route::Nodes, "updated", 1, 40, 0);
        huge.payload = Some(vec![b'x'; 2_000_000]);
        let outcome = match sink.enqueue(Arc::new(huge)).await {
            Ok(ack) => tokio::time::timeout(ACK_TIMEOUT, ack).await?,
            Err(e) => Err(e),
        };
        ensure!(
            matches!(&outcome, Err(e) if !e.is_retryable()),
            "{outcome:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_jetstream_delivers_everything_across_a_server_crash() -> anyhow::Result<()> {
    run(async {
        let mut nats = Nats::start().await;
        let cfg = nats_config(&nats, NatsMode::JetStream);
        let sink = NatsSink::new(&cfg)?;
        tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
        let retries_before = metrics::metrics().sink_retries_total.get();

        let msgs: Vec<Arc<Message>> = (0..900)
            .map(|n| Arc::new(message(Route::Nodes, "updated", n, 50, 300)))
            .collect();
        let flag = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        publish_tracked(
            &sink,
            &msgs[..300],
            &flag,
            &acked,
            &mut tasks,
            Some((50, Duration::from_millis(20))),
        )
        .await?;
        nats.kill();
        let killed_at = Instant::now();
        // Enqueue may wait (and the caller retry) while the client reconnects: run the rest
        // of the stream on its own task, and restart the server meanwhile.
        let rest = msgs[300..].to_vec();
        let publisher = {
            let (flag, acked) = (flag.clone(), acked.clone());
            let sink = Arc::new(sink);
            let sink2 = sink.clone();
            let handle = tokio::spawn(async move {
                let mut tasks = Vec::new();
                for chunk in rest.chunks(50) {
                    // Enqueue errors are retryable here (server down): retry like the window.
                    let mut left = chunk.to_vec();
                    while !left.is_empty() {
                        match publish_tracked(
                            sink2.as_ref(),
                            &left[..1],
                            &flag,
                            &acked,
                            &mut tasks,
                            None,
                        )
                        .await
                        {
                            Ok(()) => {
                                left.remove(0);
                            }
                            Err(e) => {
                                eprintln!("enqueue failed (retrying): {e:#}");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                anyhow::Ok(tasks)
            });
            (handle, sink)
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        nats.restart().await;
        eprintln!("nats down for {:?}", killed_at.elapsed());
        let restarted_at = Instant::now();
        let (handle, sink) = publisher;
        let late_tasks = tokio::time::timeout(RECOVERY_TIMEOUT, handle)
            .await
            .context("publisher stuck")???;
        tasks.extend(late_tasks);
        await_tasks(tasks, RECOVERY_TIMEOUT).await?;
        eprintln!(
            "all {} acks resolved {:?} after the restart; {} retries counted",
            msgs.len(),
            restarted_at.elapsed(),
            metrics::metrics().sink_retries_total.get() - retries_before
        );
        drop(sink);

        // The store survives the restart: every message must be there, once.
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client);
        let got = read_stream(&js, &cfg.stream, Duration::from_secs(30)).await?;
        let ids: Vec<String> = got
            .iter()
            .filter_map(|m| header(&nats_headers(m), "Nats-Msg-Id").map(str::to_string))
            .collect();
        let distinct: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let lost: Vec<&str> = msgs
            .iter()
            .map(|m| m.id.as_str())
            .filter(|id| !distinct.contains(id))
            .collect();
        eprintln!(
            "stream holds {} messages, {} distinct ids",
            ids.len(),
            distinct.len()
        );
        ensure!(
            lost.is_empty(),
            "{} messages lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_core_reaches_a_subscriber() -> anyhow::Result<()> {
    run(async {
        let nats = Nats::start().await;
        let client = async_nats::connect(nats.url()).await?;
        let mut subscriber = client.subscribe("synaptask.>").await?;
        // The subscription must reach the server before anything is published.
        client.flush().await?;

        let cfg = nats_config(&nats, NatsMode::Core);
        let sink = NatsSink::new(&cfg)?;
        let ready = tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
        eprintln!("prepare: {ready}");
        let sent = mixed_batch(500);
        publish_all(&sink, &sent, ACK_TIMEOUT).await?;
        let want: Vec<&Arc<Message>> = sent.iter().filter(|m| m.payload.is_some()).collect();
        let mut got = Vec::new();
        while got.len() < want.len() {
            match tokio::time::timeout(Duration::from_secs(10), subscriber.next()).await {
                Ok(Some(m)) => got.push(m),
                _ => bail!("subscriber got {} of {}", got.len(), want.len()),
            }
        }
        for (m, g) in want.iter().zip(&got) {
            let headers: Vec<(String, String)> = g
                .headers
                .iter()
                .flat_map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                })
                .collect();
            ensure!(
                header(&headers, "Nats-Msg-Id") == Some(m.id.as_str()),
                "{}: {headers:?}",
                m.id
            );
            ensure!(
                Some(g.payload.as_ref()) == m.payload.as_deref(),
                "{}: payload",
                m.id
            );
        }
        ensure!(
            got[0].subject.as_str() == "synaptask.nodes.updated",
            "first subject {}",
            got[0].subject
        );
        Ok(())
    })
    .await
}

fn small_messages(count: usize) -> Vec<Arc<Message>> {
    (0..count)
        .map(|n| Arc::new(message(Route::Nodes, "updated", n, 5_000, 300)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn throughput_of_each_sink() -> anyhow::Result<()> {
    run(async {
        let msgs = small_messages(THROUGHPUT_MESSAGES);
        let bytes = msgs[0].payload.as_ref().map_or(0, Vec::len);
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };

        let tansu = Tansu::start().await;
        let kafka = KafkaSink::new(&kafka_config(&tansu))?;
        tokio::time::timeout(Duration::from_secs(30), kafka.prepare()).await??;
        let took = publish_all(&kafka, &msgs, Duration::from_secs(180)).await?;
        eprintln!(
            "THROUGHPUT kafka (tansu, {profile}): {} msgs of {bytes} B in {took:.2?} = {:.0} msgs/s",
            msgs.len(),
            msgs.len() as f64 / took.as_secs_f64()
        );
        drop(kafka);
        drop(tansu);

        for mode in [NatsMode::JetStream, NatsMode::Core] {
            // A fresh server each: core publishes into a stream's subjects would be stored too.
            let nats = Nats::start().await;
            let sink = NatsSink::new(&nats_config(&nats, mode))?;
            tokio::time::timeout(Duration::from_secs(30), sink.prepare()).await??;
            let took = publish_all(&sink, &msgs, Duration::from_secs(180)).await?;
            eprintln!(
                "THROUGHPUT nats {mode:?} ({profile}): {} msgs of {bytes} B in {took:.2?} = {:.0} msgs/s",
                msgs.len(),
                msgs.len() as f64 / took.as_secs_f64()
            );
        }
        Ok(())
    })
    .await
}
