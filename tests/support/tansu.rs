//! A throwaway tansu Kafka broker with in-memory storage: every start, including a restart on
//! the same port, begins with no topics, and topics must be created explicitly.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use tempfile::TempDir;

use super::process::{cargo_bin, find_binary, BrokerProcess};

const INSTALL_HINT: &str = "`cargo install tansu@0.6.0 --features dynostore,libsql` \
     (about 14 minutes on 2 cores; or point $TANSU_BIN at a binary)";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// A running tansu broker on 127.0.0.1; dropping it kills the broker.
pub struct Tansu {
    port: u16,
    process: BrokerProcess,
    // Last field so the log survives until the process is dead.
    dir: TempDir,
}

impl Tansu {
    /// Starts tansu on a free port and waits until it answers a Kafka metadata request.
    pub async fn start() -> Tansu {
        let fallbacks: Vec<PathBuf> = cargo_bin("tansu").into_iter().collect();
        let program = find_binary("tansu", "TANSU_BIN", &fallbacks, INSTALL_HINT);
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .expect("tansu tempdir");
        let port = super::free_port();
        let process = BrokerProcess::new(
            "tansu",
            program,
            broker_args(port),
            dir.path().join("tansu.log"),
        );
        let mut tansu = Tansu { port, process, dir };
        tansu.restart().await;
        tansu
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The Kafka port, which stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client config with `bootstrap.servers` set, to extend with producer/consumer settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        config
    }

    /// SIGKILLs the broker, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the broker again on the same port; call [`Tansu::kill`] first.
    /// Storage is in memory, so topics and messages from before are gone.
    pub async fn restart(&mut self) {
        self.process.spawn();
        let bootstrap = self.bootstrap();
        self.process
            .wait_ready(READY_TIMEOUT, || answers_metadata(bootstrap.clone()))
            .await;
    }

    /// Creates a topic through the Kafka admin API and waits until metadata lists it with all
    /// its partitions, because tansu never auto-creates topics.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .expect("create rdkafka AdminClient");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .unwrap_or_else(|e| {
                self.process
                    .fail(&format!("create_topics({name}) failed: {e}"))
            });
        for result in results {
            if let Err((topic, code)) = result {
                self.process
                    .fail(&format!("create_topics({topic}) returned {code:?}"));
            }
        }
        self.wait_for_partitions(name, partitions as usize).await;
    }

    /// The partition count metadata reports for `name`, or `None` if the broker has no such
    /// topic.
    pub async fn partition_count(&self, name: &str) -> Option<usize> {
        let config = self.client_config();
        let name = name.to_owned();
        // fetch_metadata blocks on librdkafka's reply.
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create().expect("create rdkafka BaseConsumer");
            let metadata = consumer
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .unwrap_or_else(|e| panic!("metadata for {name}: {e}"));
            let topic = metadata.topics().iter().find(|t| t.name() == name)?;
            (topic.error().is_none() && !topic.partitions().is_empty())
                .then(|| topic.partitions().len())
        })
        .await
        .expect("metadata task panicked")
    }

    /// The end of the broker's log, for assertions that want context.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Where the broker's stdout and stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    async fn wait_for_partitions(&self, name: &str, partitions: usize) {
        for _ in 0..50 {
            if self.partition_count(name).await == Some(partitions) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.process.fail(&format!(
            "topic {name} never showed {partitions} partitions"
        ));
    }
}

/// The command line; the advertised URL must match the listener because clients reconnect to
/// whatever metadata advertises (tansu's default is localhost:9092).
fn broker_args(port: u16) -> Vec<String> {
    let url = format!("tcp://127.0.0.1:{port}");
    [
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
        "--storage-engine",
        "memory://tansu/",
    ]
    .map(String::from)
    .to_vec()
}

/// True once a TCP connect succeeds and a real Kafka metadata request lists at least one
/// broker; the port alone can open before the broker serves requests.
async fn answers_metadata(bootstrap: String) -> bool {
    if tokio::net::TcpStream::connect(&bootstrap).await.is_err() {
        return false;
    }
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("create rdkafka BaseConsumer");
        consumer
            .fetch_metadata(None, METADATA_TIMEOUT)
            .is_ok_and(|metadata| !metadata.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}
