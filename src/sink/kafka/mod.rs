//! The Kafka sink: one idempotent librdkafka producer, topics per [`Route`], and the recovery
//! that makes delivery at-least-once across broker crashes.
//!
//! Every message gets a sequence number when it is enqueued and stays in this sink's books
//! (`sent` while librdkafka holds it, `backlog` while it waits for a resend) until the broker
//! acknowledged it or refused it for good. A retryable delivery failure does not fail the
//! [`AckFuture`]: it puts the message in the backlog and starts a recovery, which
//!
//! 1. replaces the producer (dropping the old one purges whatever it still holds into the
//!    backlog, and a fresh producer id avoids sequence errors from a broker that lost state),
//! 2. waits until the broker answers and every topic exists, re-creating missing topics when
//!    `create_topics` is on (tansu with memory storage comes back empty after a restart),
//! 3. resends the backlog in sequence order, so a key's records keep their order, which matters
//!    on compacted topics where the last write wins.
//!
//! New messages queue behind the backlog while a recovery runs. A watchdog also starts one
//! when deliveries stall while a topic is missing, because librdkafka may wait for a deleted
//! topic instead of failing its messages. Resends carry the same `ce_id` header, so a consumer
//! can drop the duplicates a crash may cause.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientConfig;
use tokio::sync::{oneshot, Notify};

use super::{AckFuture, Format, Message, Route, Sink, SinkError};
use crate::backoff::Backoff;
use crate::metrics;
use crate::secret::Secret;

mod admin;
mod config;
mod recovery;
pub use config::{KafkaConfig, KafkaTopics};
use recovery::worker;

const NAME: &str = "kafka";
/// Bound on one metadata request; the broker is "unreachable" past it.
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on topic creation, and on waiting for created topics to show in metadata.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watchdog looks for stalled deliveries.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);
/// Deliveries this long without progress make the watchdog check the topics.
const STALL_AFTER: Duration = Duration::from_secs(2);
/// Deliveries this long without progress, although the broker answers and has every topic,
/// replace the producer: a broker that lost its producer state answers an old producer id with
/// UNKNOWN_PRODUCER_ID until the message timeout, and librdkafka keeps retrying meanwhile.
const STALL_RESET_AFTER: Duration = Duration::from_secs(10);
/// First wait of a recovery (lets the rest of a failing burst land) and its growth limit.
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Waits while librdkafka's local queue is full.
const QUEUE_FULL_WAIT_MIN: Duration = Duration::from_millis(1);
const QUEUE_FULL_WAIT_MAX: Duration = Duration::from_millis(100);

/// Publishes to Kafka through one idempotent librdkafka producer (see the module docs).
pub struct KafkaSink {
    shared: Arc<Shared>,
    worker: OnceLock<tokio::task::JoinHandle<()>>,
}

type KafkaProducer = ThreadedProducer<DeliveryContext>;

/// What the sink, its recovery worker and the producer's delivery callback share.
struct Shared {
    /// Producer properties, including the password: never formatted.
    config: ClientConfig,
    brokers: String,
    topics: KafkaTopics,
    format: Format,
    create_topics: bool,
    partitions: i32,
    replication_factor: i32,
    books: Mutex<Books>,
    /// Wakes the worker when a recovery starts.
    wake: Notify,
    /// Milliseconds since `epoch` at the last successful delivery or first send into an idle
    /// producer; the watchdog measures stalls from it.
    progress_ms: AtomicU64,
    epoch: Instant,
}

/// Where every unacknowledged message is. Guarded by one mutex, held only for short
/// non-blocking sections (librdkafka's `produce` never blocks or calls back).
struct Books {
    producer: Option<Arc<KafkaProducer>>,
    /// Bumped with each new producer, so late callbacks of an old one are recognised.
    generation: u64,
    next_seq: usize,
    /// Handed to the current producer: seq -> (generation, message).
    sent: BTreeMap<usize, (u64, Pending)>,
    /// Waiting for a resend, in sequence order.
    backlog: BTreeMap<usize, Pending>,
    /// A recovery is under way: new messages go to the backlog so they stay behind it.
    recovering: bool,
    /// A message resent by the current recovery failed again: the recovery starts over so
    /// that the order holds.
    restart: bool,
    /// While a recovery is pending: per (route, key), the newest message delivered (by the
    /// old producer, after an older message of some key failed). A resend of an older message
    /// of that key would land after it, so the recovery sends it again last: on a compacted
    /// topic the newest version (or tombstone) must stay the key's last record.
    superseded: HashMap<(Route, String), (usize, Arc<Message>)>,
}

struct Pending {
    msg: Arc<Message>,
    tx: oneshot::Sender<Result<(), SinkError>>,
}

impl Pending {
    fn resolve(self, result: Result<(), SinkError>) {
        // The receiver is gone when nobody waits for this ack any more; nothing to tell.
        let _ = self.tx.send(result);
    }
}

/// The producer's context: routes delivery reports into the books.
struct DeliveryContext {
    shared: Weak<Shared>,
    generation: u64,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka logs each broker failure and also raises it as an error event (below);
        // keep the log copy quiet unless it is severe.
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(sink = NAME, facility = fac, "librdkafka: {message}")
            }
            _ => tracing::debug!(sink = NAME, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reasons name brokers and error codes, never credentials.
        tracing::warn!(sink = NAME, error = %error, "librdkafka: {reason}");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        // Gone while the sink is being dropped: the pending acks resolve as cancelled.
        if let Some(shared) = self.shared.upgrade() {
            let error = result.as_ref().err().map(|(e, _)| e.clone());
            shared.delivered(self.generation, seq, error);
        }
    }
}

/// How a delivery or enqueue error is handled.
enum Class {
    /// Resend later.
    Retry,
    /// The broker will never take this message.
    Fatal(String),
}

fn classify(e: &KafkaError) -> Class {
    match e.rdkafka_error_code() {
        Some(code) if is_fatal_code(code) => Class::Fatal(e.to_string()),
        _ => Class::Retry,
    }
}

/// Errors no resend can fix: the message or the credentials are wrong. Everything else
/// (connection loss, timeouts, unknown topic, idempotence state lost by the broker, a fatal
/// producer state) is worth a fresh producer and a resend.
fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | MessageBatchTooLarge
            | InvalidTopic
            | InvalidRecord
            | InvalidRequiredAcks
            | InvalidTimestamp
            | UnsupportedForMessageFormat
            | UnsupportedCompressionType
            | PolicyViolation
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | SaslAuthenticationFailed
            | Authentication
            | IllegalSASLState
            | UnsupportedSASLMechanism
            | InvalidArgument
    )
}

fn fatal(message: impl Into<String>) -> SinkError {
    SinkError::Fatal {
        sink: NAME.into(),
        message: message.into(),
    }
}

fn retryable(message: impl Into<String>) -> SinkError {
    SinkError::Retryable {
        sink: NAME.into(),
        message: message.into(),
    }
}

/// A client creation error without the offending value, which may be a secret.
fn describe_client_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, description, key, _value) => {
            format!("invalid librdkafka property {key}: {description}")
        }
        other => other.to_string(),
    }
}

/// The producer's librdkafka settings: the sink's defaults, then `properties` over them, then
/// the SASL password from `password_env`. Public so that a benchmark's raw producer can use
/// exactly these. Fails when `password_env` names an unset variable.
pub fn client_config(cfg: &KafkaConfig) -> Result<ClientConfig, SinkError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &cfg.brokers);
    config.set("client.id", "taskstream");
    config.set("enable.idempotence", "true");
    config.set("acks", "all");
    // Latency first: automations wait on status changes. A message goes out at once; under
    // load batches still form while earlier requests are in flight. Measured with
    // `cargo bench --bench latency` at 1,000 diffs/s: p50/p99 5.6/25 ms with 5 ms (the
    // librdkafka default), 2.2/9.3 with 1 ms, 0.8/4.9 with 0; the e2e benchmark's Kafka
    // rate is about 13 % lower with 0 than with 5. lz4 is cheap on CPU. `properties`
    // overrides any of these.
    config.set("linger.ms", "0");
    // Nagle's algorithm would hold a request written while the previous one is
    // unacknowledged until the broker's delayed ACK (about 40 ms on Linux).
    config.set("socket.nagle.disable", "true");
    config.set("compression.type", "lz4");
    config.set("batch.num.messages", "10000");
    config.set("batch.size", "1048576");
    config.set("queue.buffering.max.messages", "200000");
    // Same key -> same partition as the Java client, so mixed producers agree.
    config.set("partitioner", "murmur2_random");
    // librdkafka retries transient errors itself within this bound; past it the message
    // comes back to us and is resent by a recovery, so a stall never lasts forever.
    config.set("message.timeout.ms", "300000");
    // Reconnect quickly after a broker restart (librdkafka's default backs off to 10 s).
    config.set("reconnect.backoff.ms", "100");
    config.set("reconnect.backoff.max.ms", "2000");
    for (key, value) in &cfg.properties {
        config.set(key, value);
    }
    if let Some(var) = cfg.password_env.as_deref() {
        let secret = Secret::load(Some(var), None)
            .map_err(|e| fatal(e.to_string()))?
            .ok_or_else(|| fatal(format!("password_env: variable {var} is unset or empty")))?;
        config.set("sasl.password", secret.expose());
    }
    Ok(config)
}

impl KafkaSink {
    /// Builds the producer from the config (no network yet: librdkafka connects in the
    /// background). Fails on invalid properties or an unset `password_env` variable.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, SinkError> {
        if cfg.partitions < 1 || cfg.replication_factor < 1 {
            return Err(fatal(
                "partitions and replication_factor must be at least 1",
            ));
        }
        let config = client_config(cfg)?;

        let shared = Arc::new(Shared {
            config,
            brokers: cfg.brokers.clone(),
            topics: cfg.topics.clone(),
            format: cfg.format.unwrap_or_default(),
            create_topics: cfg.create_topics,
            partitions: cfg.partitions,
            replication_factor: cfg.replication_factor,
            books: Mutex::new(Books {
                producer: None,
                generation: 0,
                next_seq: 0,
                sent: BTreeMap::new(),
                backlog: BTreeMap::new(),
                recovering: false,
                restart: false,
                superseded: HashMap::new(),
            }),
            wake: Notify::new(),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let producer = shared.new_producer(0)?;
        shared.lock().producer = Some(Arc::new(producer));
        Ok(Self {
            shared,
            worker: OnceLock::new(),
        })
    }

    /// Starts the recovery worker on first use (it needs a Tokio runtime, which `new` may not
    /// have).
    fn ensure_worker(&self) {
        self.worker
            .get_or_init(|| tokio::spawn(worker(self.shared.clone())));
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.get() {
            worker.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Books> {
        // Nothing panics while holding the lock; if something did, the books are still
        // consistent enough to keep delivering.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_producer(self: &Arc<Self>, generation: u64) -> Result<KafkaProducer, SinkError> {
        let context = DeliveryContext {
            shared: Arc::downgrade(self),
            generation,
        };
        ThreadedProducer::from_config_and_context(&self.config, context)
            .map_err(|e| fatal(describe_client_error(&e)))
    }

    fn mark_progress(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress_ms.store(ms, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let then = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(then)
    }

    /// Hands one message to the current producer and books it as sent. Called with the books
    /// locked, which is fine: `produce` neither blocks nor calls back.
    fn send_locked(
        books: &mut Books,
        topics: &KafkaTopics,
        format: Format,
        seq: usize,
        pending: Pending,
    ) -> Result<(), (KafkaError, Pending)> {
        let Some(producer) = books.producer.clone() else {
            return Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
                pending,
            ));
        };
        let msg = pending.msg.clone();
        let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len() + 1);
        for (key, value) in msg.headers_for(format) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topics.topic(msg.route), seq)
                .key(msg.key_bytes(format))
                .headers(headers);
        // A record without the body of this sink's format is a wiring bug: sent as JSON rather
        // than not at all, and logged.
        let body = msg.body(format).unwrap_or_else(|e| {
            tracing::error!(error = %e, "sending the JSON body instead");
            msg.payload.as_deref()
        });
        if let Some(payload) = body {
            record = record.payload(payload);
        }
        // No payload stays a null value: a tombstone.
        match producer.send(record).map_err(|(e, _record)| e) {
            Ok(()) => {
                books.sent.insert(seq, (books.generation, pending));
                Ok(())
            }
            Err(e) => Err((e, pending)),
        }
    }

    /// Puts the books into recovery and wakes the worker (once per recovery).
    fn start_recovery(&self, books: &mut Books, why: &str) {
        if !books.recovering {
            books.recovering = true;
            tracing::warn!(
                sink = NAME,
                reason = why,
                "delivery failed; recovering (resending in order)"
            );
            self.wake.notify_one();
        }
    }

    /// A delivery report: resolve the ack, or put the message in the backlog.
    fn delivered(&self, generation: u64, seq: usize, error: Option<KafkaError>) {
        let mut books = self.lock();
        match books.sent.get(&seq) {
            Some((g, _)) if *g == generation => {}
            // Already moved to the backlog when its producer was replaced (and maybe resent
            // by a newer one, whose report is the one that counts).
            _ => return,
        }
        let Some((_, pending)) = books.sent.remove(&seq) else {
            return;
        };
        match error {
            None => {
                if books.recovering || !books.backlog.is_empty() {
                    let key = (pending.msg.route, pending.msg.key.clone());
                    if books.superseded.get(&key).is_none_or(|(s, _)| *s < seq) {
                        books
                            .superseded
                            .insert(key, (seq, Arc::clone(&pending.msg)));
                    }
                }
                drop(books);
                self.mark_progress();
                pending.resolve(Ok(()));
            }
            Some(e) => match classify(&e) {
                Class::Fatal(reason) => {
                    drop(books);
                    pending.resolve(Err(fatal(reason)));
                }
                Class::Retry => {
                    metrics::inc(&metrics::metrics().sink_retries_total);
                    books.backlog.insert(seq, pending);
                    if books.recovering && generation == books.generation {
                        books.restart = true;
                    }
                    self.start_recovery(&mut books, &e.to_string());
                }
            },
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        NAME
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        async move {
            self.ensure_worker();
            let shared = &self.shared;
            let (tx, rx) = oneshot::channel();
            let mut pending = Pending { msg, tx };
            let mut wait = Backoff::new(QUEUE_FULL_WAIT_MIN, QUEUE_FULL_WAIT_MAX);
            loop {
                // The guard must not live across the sleep, hence the block.
                let queue_full = {
                    let mut books = shared.lock();
                    let seq = books.next_seq;
                    if books.recovering {
                        books.next_seq += 1;
                        books.backlog.insert(seq, pending);
                        break;
                    }
                    if books.sent.is_empty() {
                        // Stalls are measured from the first message after an idle spell.
                        shared.mark_progress();
                    }
                    match Shared::send_locked(
                        &mut books,
                        &shared.topics,
                        shared.format,
                        seq,
                        pending,
                    ) {
                        Ok(()) => {
                            books.next_seq += 1;
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), p)) => p,
                        Err((e, p)) => match classify(&e) {
                            Class::Fatal(reason) => return Err(fatal(reason)),
                            Class::Retry => {
                                metrics::inc(&metrics::metrics().sink_retries_total);
                                books.next_seq += 1;
                                books.backlog.insert(seq, p);
                                shared.start_recovery(&mut books, &e.to_string());
                                break;
                            }
                        },
                    }
                };
                // Callers await enqueue one at a time, so waiting here keeps the order.
                pending = queue_full;
                tokio::time::sleep(wait.next_delay()).await;
            }
            let ack: AckFuture = async move {
                rx.await
                    .unwrap_or_else(|_| Err(SinkError::Cancelled { sink: NAME.into() }))
            }
            .boxed();
            Ok(ack)
        }
        .boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async move {
            self.ensure_worker();
            let topics = self.shared.ensure_topics().await?;
            Ok(format!(
                "kafka {}: {topics} topics ready",
                self.shared.brokers
            ))
        }
        .boxed()
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let missing = self
                .shared
                .missing_topics()
                .await
                .map_err(|e| retryable(format!("{}: {e}", self.shared.brokers)))?;
            if missing.is_empty() {
                Ok(())
            } else {
                Err(retryable(format!("topics missing: {}", missing.join(", "))))
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            self.ensure_worker();
            let target = self.shared.lock().next_seq;
            loop {
                let (done, producer) = {
                    let books = self.shared.lock();
                    let lowest = [books.sent.keys().next(), books.backlog.keys().next()]
                        .into_iter()
                        .flatten()
                        .min();
                    (lowest.is_none_or(|s| *s >= target), books.producer.clone())
                };
                if done {
                    return Ok(());
                }
                if let Some(producer) = producer {
                    // flush() sends lingering batches now and blocks while it waits.
                    let _ = tokio::task::spawn_blocking(move || {
                        producer.flush(Duration::from_millis(100))
                    })
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity_msg(key: &str, id: &str, payload: Option<&str>) -> Arc<Message> {
        Arc::new(Message {
            avro: None,
            avro_key: None,
            route: Route::Nodes,
            event: if payload.is_some() {
                "updated"
            } else {
                "tombstone"
            }
            .into(),
            id: id.into(),
            key: key.into(),
            payload: payload.map(|p| p.as_bytes().to_vec()),
            headers: vec![],
        })
    }

    /// Issue 8 item 3, against librdkafka's mock cluster: an update's delivery fails (a
    /// timeout while the broker was away) and goes to the backlog, while the old producer
    /// still delivers the key's later tombstone. The recovery's resend of the update lands
    /// after the tombstone; the tombstone must then be sent again, or compaction would bring
    /// the deleted entity back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resend_never_leaves_an_older_record_last_for_its_key() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message as _;

        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        let cfg = KafkaConfig {
            enabled: true,
            brokers: mock.bootstrap_servers(),
            partitions: 1,
            // The mock cluster has no admin API.
            create_topics: false,
            ..Default::default()
        };
        for topic in cfg.topics.distinct().keys() {
            mock.create_topic(topic, 1, 1).unwrap();
        }
        let sink = KafkaSink::new(&cfg).unwrap();
        sink.prepare().await.unwrap();
        let shared = Arc::clone(&sink.shared);

        let (update_tx, update_rx) = oneshot::channel();
        let (tomb_tx, tomb_rx) = oneshot::channel();
        let (generation, seq_update, seq_tomb) = {
            let mut books = shared.lock();
            let seq = books.next_seq;
            books.next_seq += 2;
            let pending = Pending {
                msg: entity_msg("k", "node:k:5", Some("update v5")),
                tx: update_tx,
            };
            let generation = books.generation;
            books.sent.insert(seq, (generation, pending));
            (generation, seq, seq + 1)
        };
        // The update's report: timed out. It goes to the backlog; a recovery is asked for.
        shared.delivered(
            generation,
            seq_update,
            Some(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )),
        );
        // The old producer still holds the later tombstone and delivers it.
        {
            let mut books = shared.lock();
            assert!(books.recovering);
            let pending = Pending {
                msg: entity_msg("k", "node:k:6:tombstone", None),
                tx: tomb_tx,
            };
            assert!(Shared::send_locked(
                &mut books,
                &shared.topics,
                shared.format,
                seq_tomb,
                pending
            )
            .is_ok());
        }
        tokio::time::timeout(Duration::from_secs(10), tomb_rx)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // Now the recovery runs and resends the update.
        sink.ensure_worker();
        tokio::time::timeout(Duration::from_secs(20), update_rx)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), sink.flush())
            .await
            .unwrap()
            .unwrap();

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "order-check")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("synaptask.nodes", 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut got: Vec<Option<String>> = Vec::new();
        let mut idle = Instant::now();
        while idle.elapsed() < Duration::from_secs(3) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                idle = Instant::now();
                got.push(m.payload().map(|p| String::from_utf8_lossy(p).to_string()));
            }
        }
        assert_eq!(
            got.first(),
            Some(&None),
            "the tombstone landed first: {got:?}"
        );
        assert!(got.contains(&Some("update v5".into())), "{got:?}");
        assert_eq!(
            got.last(),
            Some(&None),
            "a tombstone is the key's last record: {got:?}"
        );
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg: KafkaConfig = serde_json::from_str("{}").unwrap();
        assert!(!cfg.enabled);
        assert_eq!(cfg.brokers, "127.0.0.1:9092");
        assert_eq!(cfg.topics.topic(Route::DeadLetter), "synaptask.dlq");
        assert!(cfg.create_topics);
        assert_eq!((cfg.partitions, cfg.replication_factor), (3, 1));
        let compacted = cfg.topics.distinct();
        assert_eq!(compacted.get("synaptask.nodes"), Some(&true));
        assert_eq!(compacted.get("synaptask.status"), Some(&false));
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"brokerz":"x"}"#).is_err());
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"topics":{"nodez":"x"}}"#).is_err());
    }

    #[test]
    fn debug_hides_secret_properties() {
        let mut cfg = KafkaConfig::default();
        cfg.properties
            .insert("sasl.password".into(), "hunter2".into());
        cfg.properties.insert("sasl.username".into(), "svc".into());
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("svc"),
            "{shown}"
        );
    }

    #[test]
    fn unset_password_variable_is_fatal_and_names_only_the_variable() {
        let cfg = KafkaConfig {
            password_env: Some("TASKSTREAM_TEST_UNSET_KAFKA_PASSWORD".into()),
            ..KafkaConfig::default()
        };
        let err = KafkaSink::new(&cfg).err().unwrap();
        assert!(!err.is_retryable());
        assert!(err
            .to_string()
            .contains("TASKSTREAM_TEST_UNSET_KAFKA_PASSWORD"));
    }
}
