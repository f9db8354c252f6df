//! A replayable source on a Kafka-protocol topic (Kafka, Redpanda, tansu), through the
//! pure-Rust `rskafka` client. The driver owns the offsets: no consumer group, nothing
//! committed to the broker. Offsets are Kafka's (record numbers); a record's payload is its
//! value (its key and headers are not read; a record with no value is an empty payload).
//!
//! ```text
//!  plan(partition, from):  fetch from `from` until an empty fetch or the limits
//!                          ─► until = the last record's offset + 1, records counted
//!  read(range):            fetch `from..until` again (the same records: offsets are fixed)
//! ```
//!
//! Where a range ends is found by fetching, not from the broker's end offset: one broker that
//! speaks the protocol (tansu 0.6) reports a partition's end offset too low after a producer
//! batch (1 after a batch of 3 records), and fetching also measures the records against the
//! block size. The cost: the driver reads each range once more than a reader would.
//!
//! Failures: a broker that cannot be reached is [`SourceError::Unavailable`] (the next
//! batches try again with backoff; a read retries for a while); records deleted below a
//! recorded offset (retention, a recreated topic) are [`SourceError::Truncated`]; a partition
//! that disappears is [`SourceError::PartitionGone`]; a record larger than the block size is
//! [`SourceError::RecordTooLarge`]. Topics compressed with gzip or snappy are read; lz4 and
//! zstd are not built in (they would build C libraries) and fail the read with rskafka's error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::{Record, RecordAndOffset};
use tokio::sync::Mutex;
use tributary::{DirectSource, OffsetRange, PlannedRange, RangeLimits, RangeSink, SourceError};

/// Bytes asked for per fetch.
const FETCH_BYTES: i32 = 1 << 20;
/// How long the broker may hold a fetch waiting for records.
const FETCH_WAIT_MS: i32 = 10;

/// One topic of a Kafka-protocol broker, as a [`DirectSource`].
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tributary_receivers::kafka::KafkaTopic;
/// let topic = KafkaTopic::new("127.0.0.1:9092", "events");
/// topic.create(4).await?;                        // if it does not exist yet
/// topic.produce(0, vec![b"first".to_vec()]).await?;
/// // ctx.direct_stream("events", topic)
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaTopic {
    bootstrap: String,
    topic: String,
    /// How long one request keeps retrying a broker before the source counts as unavailable.
    patience: Duration,
    state: Arc<Mutex<Connected>>,
}

impl std::fmt::Debug for KafkaTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTopic")
            .field("bootstrap", &self.bootstrap)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Connected {
    client: Option<Arc<Client>>,
    partitions: HashMap<i32, Arc<PartitionClient>>,
}

impl KafkaTopic {
    /// Topic `topic` of the broker at `bootstrap` (`host:port`). Nothing connects until the
    /// stream starts; a broker that is down then is retried.
    pub fn new(bootstrap: impl Into<String>, topic: impl Into<String>) -> KafkaTopic {
        KafkaTopic {
            bootstrap: bootstrap.into(),
            topic: topic.into(),
            patience: Duration::from_secs(2),
            state: Arc::default(),
        }
    }

    /// How long one request retries an unreachable broker before giving up for this batch
    /// (default 2 s; the next batches try again).
    pub fn patience(mut self, patience: Duration) -> KafkaTopic {
        self.patience = patience;
        self
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn unavailable(&self, e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
        SourceError::Unavailable {
            what: format!("Kafka broker {} (topic {})", self.bootstrap, self.topic),
            source: Box::new(e),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, SourceError> {
        let mut s = self.state.lock().await;
        if let Some(c) = &s.client {
            return Ok(c.clone());
        }
        let backoff = rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
            deadline: Some(self.patience),
        };
        let build = ClientBuilder::new(vec![self.bootstrap.clone()])
            .client_id("tributary")
            .backoff_config(backoff)
            .build();
        let client = match tokio::time::timeout(self.patience * 2, build).await {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => return Err(self.unavailable(e)),
            Err(e) => return Err(self.unavailable(e)),
        };
        s.client = Some(client.clone());
        Ok(client)
    }

    async fn partition_client(&self, partition: u32) -> Result<Arc<PartitionClient>, SourceError> {
        let p = partition as i32;
        if let Some(c) = self.state.lock().await.partitions.get(&p) {
            return Ok(c.clone());
        }
        let client = self.client().await?;
        let pc = client
            .partition_client(self.topic.clone(), p, UnknownTopicHandling::Error)
            .await
            .map_err(|e| self.map_error(partition, 0, e))?;
        let pc = Arc::new(pc);
        self.state.lock().await.partitions.insert(p, pc.clone());
        Ok(pc)
    }

    /// A client error as a source error (`offset`: where the request read from).
    fn map_error(&self, partition: u32, offset: u64, e: KafkaError) -> SourceError {
        match &e {
            KafkaError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            } => SourceError::Truncated {
                what: DirectSource::describe(self, partition),
                end: 0,
                recorded: offset,
            },
            KafkaError::ServerError {
                protocol_error: ProtocolError::UnknownTopicOrPartition,
                ..
            } => SourceError::PartitionGone {
                partition,
                what: DirectSource::describe(self, partition),
                offset,
            },
            _ => self.unavailable(e),
        }
    }

    /// Records from `from` on, as the broker returns them (empty: nothing there yet).
    async fn fetch(&self, partition: u32, from: u64) -> Result<Vec<RecordAndOffset>, SourceError> {
        let pc = self.partition_client(partition).await?;
        let offset = i64::try_from(from).map_err(|_| SourceError::Invalid {
            what: DirectSource::describe(self, partition),
            detail: format!("offset {from} is beyond Kafka's range"),
        })?;
        let fetched = tokio::time::timeout(
            self.patience * 2,
            pc.fetch_records(offset, 1..FETCH_BYTES, FETCH_WAIT_MS),
        )
        .await
        .map_err(|e| self.unavailable(e))?;
        match fetched {
            Ok((records, _high_watermark)) => {
                Ok(records.into_iter().filter(|r| r.offset >= offset).collect())
            }
            Err(e) => {
                // The connection may be stale (a restarted broker): reconnect next time.
                if !matches!(e, KafkaError::ServerError { .. }) {
                    *self.state.lock().await = Connected::default();
                }
                Err(self.map_error(partition, from, e))
            }
        }
    }

    /// Nothing after `from`: the record before it (the last one read) must still be there,
    /// or the partition lost the records the offsets were recorded on (a broker that
    /// restarted empty, a topic deleted and created again). Not the broker's end offset:
    /// tansu reports it too low.
    async fn check_still_there(&self, partition: u32, from: u64) -> Result<(), SourceError> {
        let last = self.fetch(partition, from - 1).await?;
        if last.first().is_some_and(|r| r.offset as u64 == from - 1) {
            return Ok(());
        }
        Err(SourceError::Truncated {
            what: DirectSource::describe(self, partition),
            end: last.first().map_or(0, |r| r.offset as u64),
            recorded: from,
        })
    }

    /// Creates the topic with `partitions` partitions (replication 1); an existing topic is
    /// left as it is.
    pub async fn create(&self, partitions: u32) -> Result<(), SourceError> {
        let client = self.client().await?;
        let controller = client
            .controller_client()
            .map_err(|e| self.unavailable(e))?;
        match controller
            .create_topic(self.topic.clone(), partitions as i32, 1, 5_000)
            .await
        {
            Ok(()) => Ok(()),
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::TopicAlreadyExists,
                ..
            }) => Ok(()),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Appends `values` to `partition` (one record each); returns their offsets.
    pub async fn produce(
        &self,
        partition: u32,
        values: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, SourceError> {
        let pc = self.partition_client(partition).await?;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let now = rskafka::chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let records = values
            .into_iter()
            .map(|v| Record {
                key: None,
                value: Some(v),
                headers: Default::default(),
                timestamp: now,
            })
            .collect();
        let offsets = pc
            .produce(records, Compression::NoCompression)
            .await
            .map_err(|e| self.map_error(partition, 0, e))?;
        Ok(offsets.into_iter().map(|o| o as u64).collect())
    }
}

impl DirectSource for KafkaTopic {
    fn describe(&self, partition: u32) -> String {
        format!(
            "topic {} partition {partition} at {}",
            self.topic, self.bootstrap
        )
    }

    async fn partitions(&self) -> Result<Vec<u32>, SourceError> {
        let client = self.client().await?;
        let topics = match tokio::time::timeout(self.patience * 2, client.list_topics()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                *self.state.lock().await = Connected::default();
                return Err(self.unavailable(e));
            }
            Err(e) => return Err(self.unavailable(e)),
        };
        // A topic that does not exist (yet) has no partitions to read.
        Ok(topics
            .into_iter()
            .find(|t| t.name == self.topic)
            .map(|t| t.partitions.into_iter().map(|p| p as u32).collect())
            .unwrap_or_default())
    }

    async fn start_offset(&self, partition: u32) -> Result<u64, SourceError> {
        let pc = self.partition_client(partition).await?;
        let earliest = pc
            .get_offset(OffsetAt::Earliest)
            .await
            .map_err(|e| self.map_error(partition, 0, e))?;
        Ok(earliest.max(0) as u64)
    }

    async fn plan(
        &self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        _identity: Option<&str>,
    ) -> Result<PlannedRange, SourceError> {
        let max_records = limits.max_records.unwrap_or(u64::MAX);
        let (mut until, mut records, mut bytes) = (from, 0u64, 0usize);
        'fetch: while records < max_records {
            let batch = self.fetch(partition, until).await?;
            if batch.is_empty() {
                if records == 0 && from > 0 {
                    self.check_still_there(partition, from).await?;
                }
                break;
            }
            for r in batch {
                let len = r.record.value.as_ref().map_or(0, Vec::len);
                if len + 4 > limits.max_bytes {
                    return Err(SourceError::RecordTooLarge {
                        what: self.describe(partition),
                        offset: Some(r.offset as u64),
                        bytes: len,
                        limit: limits.max_bytes.saturating_sub(4),
                    });
                }
                if bytes + len + 4 > limits.max_bytes || records >= max_records {
                    break 'fetch;
                }
                bytes += len + 4;
                records += 1;
                until = r.offset as u64 + 1;
            }
        }
        Ok(PlannedRange { until, records })
    }

    async fn read(
        &self,
        range: OffsetRange,
        _identity: Option<&str>,
        out: &mut RangeSink,
    ) -> Result<(), SourceError> {
        let mut at = range.from;
        while at < range.until {
            let batch = self.fetch(range.partition, at).await?;
            if batch.is_empty() {
                // Planned records that are not there any more.
                return Err(SourceError::Truncated {
                    what: self.describe(range.partition),
                    end: at,
                    recorded: range.until,
                });
            }
            for r in batch {
                let offset = r.offset as u64;
                if offset >= range.until {
                    // Past the range (offsets may have gaps): done.
                    at = range.until;
                    break;
                }
                out.push(r.record.value.as_deref().unwrap_or_default())?;
                at = offset + 1;
            }
        }
        Ok(())
    }
}
