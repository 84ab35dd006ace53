//! Proves the real-broker harness in `support`: both brokers start, carry messages, fail while
//! killed, and come back on the same address after a restart.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::StorageType};
use futures_util::StreamExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;
use support::{Nats, Tansu};

const TOPIC: &str = "harness";

#[tokio::test(flavor = "multi_thread")]
async fn tansu_round_trip_then_kill_and_restart() {
    let started = Instant::now();
    let mut tansu = Tansu::start().await;
    println!("tansu start: {:?}", started.elapsed());

    tansu.create_topic(TOPIC, 3).await;
    round_trip(&tansu, "before-restart").await;

    let producer = producer(&tansu, 2_000);
    tansu.kill();
    let sent_at = Instant::now();
    let dead = producer
        .send(
            FutureRecord::to(TOPIC).key("k").payload("lost"),
            Duration::ZERO,
        )
        .await;
    assert!(
        dead.is_err(),
        "produce to a killed broker succeeded: {dead:?}"
    );
    println!(
        "produce to dead tansu failed after {:?}: {:?}",
        sent_at.elapsed(),
        dead.unwrap_err().0
    );

    let restarted = Instant::now();
    tansu.restart().await;
    println!("tansu restart: {:?}", restarted.elapsed());
    assert_eq!(
        tansu.partition_count(TOPIC).await,
        None,
        "memory storage kept {TOPIC} across restart"
    );

    tansu.create_topic(TOPIC, 3).await;
    // round_trip builds a fresh producer: an idempotent producer that lived through the restart
    // is unknown to the new broker, which answers UNKNOWN_PRODUCER_ID until every send times out.
    round_trip(&tansu, "after-restart").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_jetstream_survives_kill_and_restart() {
    let started = Instant::now();
    let mut nats = Nats::start().await;
    println!("nats start: {:?}", started.elapsed());

    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to nats");
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(1));
    let stream_config = jetstream::stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        storage: StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(stream_config)
        .await
        .expect("create stream");
    let ack = js
        .publish("harness.first", "first".into())
        .await
        .expect("send")
        .await
        .expect("ack");
    assert_eq!(ack.sequence, 1);

    nats.kill();
    let sent_at = Instant::now();
    let dead = async { js.publish("harness.outage", "outage".into()).await?.await }.await;
    assert!(
        dead.is_err(),
        "publish to a killed server was acked: {dead:?}"
    );
    println!(
        "publish to dead nats failed after {:?}: {}",
        sent_at.elapsed(),
        dead.unwrap_err()
    );

    let restarted = Instant::now();
    nats.restart().await;
    println!("nats restart: {:?}", restarted.elapsed());
    wait_connected(&client).await;
    println!(
        "client reconnected {:?} after restart began",
        restarted.elapsed()
    );

    let stream = js
        .get_stream("HARNESS")
        .await
        .expect("stream survives restart");
    let first = stream
        .get_raw_message(1)
        .await
        .expect("message 1 survives restart");
    assert_eq!(first.payload.as_ref(), b"first");
    let ack = js
        .publish("harness.after", "after".into())
        .await
        .expect("send")
        .await
        .expect("ack");
    assert!(ack.sequence >= 2, "sequence restarted: {ack:?}");
    // The outage publish sat in the client's buffer and may be flushed after reconnect, so it
    // can land in the stream even though its ack timed out.
    println!("first post-restart ack has sequence {}", ack.sequence);
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_core_pub_sub_round_trip() {
    let nats = Nats::start().await;
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to nats");
    let mut subscriber = client.subscribe("harness.core").await.expect("subscribe");
    // The subscription must reach the server before the publish, or the message is dropped.
    client.flush().await.expect("flush subscribe");
    client
        .publish("harness.core", "ping".into())
        .await
        .expect("publish");
    let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
        .await
        .expect("no message within 5 s")
        .expect("subscription closed");
    assert_eq!(message.payload.as_ref(), b"ping");
}

/// Produces five keyed messages with an idempotent acks=all producer, then reads them back
/// through a fresh consumer group.
async fn round_trip(tansu: &Tansu, tag: &str) {
    let producer = producer(tansu, 10_000);
    let sent: Vec<String> = (0..5).map(|i| format!("{tag}-{i}")).collect();
    for payload in &sent {
        let record = FutureRecord::to(TOPIC)
            .key(payload.as_str())
            .payload(payload.as_str());
        producer
            .send(record, Duration::ZERO)
            .await
            .expect("delivery");
    }

    let consumer: StreamConsumer = tansu
        .client_config()
        .set("group.id", format!("harness-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("create consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let consumed_at = Instant::now();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only got {received:?} within 30 s"))
            .expect("consume");
        received.push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
    }
    println!(
        "consumed {} ({tag}) in {:?}",
        received.len(),
        consumed_at.elapsed()
    );
    received.sort();
    assert_eq!(received, sent);
}

/// An idempotent acks=all producer whose messages give up after `timeout_ms`.
fn producer(tansu: &Tansu, timeout_ms: u32) -> FutureProducer {
    tansu
        .client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", timeout_ms.to_string())
        .create()
        .expect("create producer")
}

/// Waits for async-nats's automatic reconnect after a server restart.
async fn wait_connected(client: &async_nats::Client) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.connection_state() != async_nats::connection::State::Connected {
        assert!(
            Instant::now() < deadline,
            "client did not reconnect within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
