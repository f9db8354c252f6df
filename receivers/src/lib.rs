//! Built-in receivers for [Tributary](tributary).
//!
//! Every receiver here is written against Tributary's public API only, exactly as a user's own
//! receiver would be: if a built-in receiver needs something, users get it too.
//!
//! | receiver | feature | source |
//! | --- | --- | --- |
//! | [`publisher::SubscriberReceiver`] | `publisher` | an actor that pushes messages to its subscribers (Spark's `ActorReceiver` / Akka feeder pattern) |
//! | [`socket::SocketTextReceiver`] | `socket` | newline-delimited text from a TCP server |
//! | [`file_log::FileLog`] (a replayable source, for `direct_stream`) | `file-log` | a directory of append-only newline-delimited logs, one per partition; offsets are byte positions |
//! | `kafka::KafkaTopic` (a replayable source, for `direct_stream`) | `kafka` | a topic of a Kafka-protocol broker, read by offset with `rskafka` (no consumer group) |
//! | [`synthetic::SyntheticReceiver`] | `synthetic` | generated 100-byte text records with sequence numbers and timestamps |
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

#[cfg(feature = "publisher")]
pub mod publisher;

#[cfg(feature = "synthetic")]
pub mod synthetic;

#[cfg(feature = "socket")]
pub mod socket;

#[cfg(feature = "file-log")]
pub mod file_log;

#[cfg(feature = "kafka")]
pub mod kafka;
