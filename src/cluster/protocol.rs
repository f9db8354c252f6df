//! What the driver and a worker process say to each other beyond block storage: a task is a
//! block id and a task id (the job's code is in both processes), its result the partial's
//! bytes; a receiver is started by its stream id, and forwards its blocks to the driver.
//!
//! ```text
//!  driver ──Describe──────────────────► executor ──(job fingerprint, task slots)──►
//!         ──Run(block id, task id)───►          ──Done(partial bytes) | NotLocal | Failed──►
//!         ──Start(stream, epoch, seq)► receiver host ──Ok | Err──►
//!  ingress ◄──Block(epoch, block)──── receiver host (one block in flight per receiver)
//!          ──Ok once replicated (and logged) | Err──►
//! ```

use ractor::{ActorCell, ActorRef, BytesConvertable, RpcReplyPort};

use crate::block::{Block, BlockId};
use crate::wire::{call, cast, port_in, port_out, Ser, Wire};
use ractor::message::{BoxedDowncastErr, SerializedMessage};

/// The process group worker processes' executors join (how the driver finds them).
pub(crate) const EXECUTORS: &str = "tributary.executors";
/// The process group worker processes' receiver hosts join.
pub(crate) const RECEIVER_HOSTS: &str = "tributary.receiver-hosts";
/// The process group of the driver's ingress (where remote receivers' blocks go).
pub(crate) const INGRESS: &str = "tributary.ingress";

/// What a worker process's executor says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Description {
    /// The fingerprint of the job it was built with
    /// ([`TaskRegistry::fingerprint`](crate::batch::TaskRegistry::fingerprint)).
    pub(crate) fingerprint: u64,
    /// Tasks it runs at once.
    pub(crate) slots: u32,
}

/// Run task `task` over block `block`, which this process's block store should hold, or,
/// with `range`, over the records of a direct stream's offset range (read here).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TaskRequest {
    pub(crate) block: BlockId,
    pub(crate) task: u32,
    pub(crate) range: Option<crate::direct::DirectRange>,
}

/// How a task ran in a worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskReply {
    /// Its partial result, encoded, and how long the task's work took (µs).
    Done(Vec<u8>, u64),
    /// This process does not hold the block (any more).
    NotLocal,
    /// The task failed (an error or a panic in the job's code), or is not in this job.
    Failed(String),
    /// The reply did not decode.
    Damaged,
    /// A direct stream's source is unavailable here (the range is tried again).
    Unavailable(String),
}

impl BytesConvertable for TaskReply {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            TaskReply::Done(mut bytes, busy_us) => {
                // The time and the tag go last: no copy of a large partial.
                bytes.extend_from_slice(&busy_us.to_le_bytes());
                bytes.push(0);
                bytes
            }
            TaskReply::NotLocal => vec![1],
            TaskReply::Failed(e) => {
                let mut out = e.into_bytes();
                out.push(2);
                out
            }
            TaskReply::Damaged => vec![3],
            TaskReply::Unavailable(e) => {
                let mut out = e.into_bytes();
                out.push(4);
                out
            }
        }
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        match bytes.pop() {
            Some(0) if bytes.len() >= 8 => {
                let at = bytes.len() - 8;
                let mut busy = [0u8; 8];
                busy.copy_from_slice(&bytes[at..]);
                bytes.truncate(at);
                TaskReply::Done(bytes, u64::from_le_bytes(busy))
            }
            Some(1) if bytes.is_empty() => TaskReply::NotLocal,
            Some(2) => String::from_utf8(bytes).map_or(TaskReply::Damaged, TaskReply::Failed),
            Some(4) => String::from_utf8(bytes).map_or(TaskReply::Damaged, TaskReply::Unavailable),
            _ => TaskReply::Damaged,
        }
    }
}

/// Messages of a worker process's executor.
#[derive(ractor_cluster::RactorClusterMessage)]
pub(crate) enum TaskHostMsg {
    /// The job's fingerprint and the executor's task slots.
    #[rpc]
    Describe(RpcReplyPort<Ser<Description>>),
    /// Run a task over a block held in this process.
    #[rpc]
    Run(Ser<TaskRequest>, RpcReplyPort<TaskReply>),
    /// The driver refuses this worker, and says why (its job is another).
    Refused(Ser<String>),
}

/// Run the receiver of stream `stream` here, its blocks numbered from `first_seq`, as
/// placement `epoch` of that stream (the driver refuses blocks of an older placement).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StartReceiver {
    pub(crate) stream: u32,
    pub(crate) epoch: u64,
    pub(crate) first_seq: u64,
    /// Its adaptive ingestion rate now (`None`: unlimited, or backpressure off).
    pub(crate) rate: Option<f64>,
}

/// Stream `stream`'s receiver's new adaptive ingestion rate (records per second).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SetRate {
    pub(crate) stream: u32,
    pub(crate) rate: f64,
}

/// Messages of a worker process's receiver host.
#[derive(ractor_cluster::RactorClusterMessage)]
pub(crate) enum ReceiverHostMsg {
    /// Start a receiver of the job here.
    #[rpc]
    Start(Ser<StartReceiver>, RpcReplyPort<Ser<Result<(), String>>>),
    /// Stop every receiver here; graceful (`true`): what they buffered is cut into blocks and
    /// forwarded first. Replies when done.
    #[rpc]
    Stop(Ser<bool>, RpcReplyPort<Ser<bool>>),
    /// A receiver's new adaptive rate (the driver's rate controller).
    Rate(Ser<SetRate>),
}

/// A receiver's failure that escalated past its supervisor in a worker process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReceiverFailure {
    pub(crate) epoch: u64,
    pub(crate) child: String,
    pub(crate) error: String,
}

/// Messages of the driver's ingress.
pub(crate) enum IngressMsg {
    /// A block a remote receiver stored, with its placement's epoch: the reply comes once it
    /// is replicated and logged (then its `store_reliably` resolves), or says why not.
    Block(Wire<(u64, Block)>, RpcReplyPort<Ser<Result<(), String>>>),
    /// A receiver's failure escalated in a worker process: it ends the job, as it would in
    /// the driver.
    Failed(Ser<ReceiverFailure>),
}

/// By hand, as the block store's messages: a block goes as is (one copy less each side).
impl ractor::Message for IngressMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        Ok(match self {
            IngressMsg::Block(block, r) => call("Block", block.into_bytes(), port_out(r)),
            IngressMsg::Failed(f) => cast("Failed", f.into_bytes()),
        })
    }

    fn deserialize(msg: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match msg {
            SerializedMessage::Call {
                variant,
                args,
                reply,
                ..
            } if variant == "Block" => {
                Ok(IngressMsg::Block(Wire::from_bytes(args), port_in(reply)))
            }
            SerializedMessage::Cast { variant, args, .. } if variant == "Failed" => {
                Ok(IngressMsg::Failed(Ser::from_bytes(args)))
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

fn remote_members<M: ractor::Message>(group: &str, node: u64) -> Vec<ActorRef<M>> {
    ractor::pg::get_members(&group.to_string())
        .into_iter()
        .filter(|c: &ActorCell| !c.get_id().is_local() && c.get_id().node() == node)
        .map(ActorRef::from)
        .collect()
}

/// The executors of the process `node`, as the driver sees them.
pub(crate) fn executors_of(node: u64) -> Vec<ActorRef<TaskHostMsg>> {
    remote_members(EXECUTORS, node)
}

/// The receiver hosts of the process `node`, as the driver sees them.
pub(crate) fn receiver_hosts_of(node: u64) -> Vec<ActorRef<ReceiverHostMsg>> {
    remote_members(RECEIVER_HOSTS, node)
}

/// The driver's ingress, as a worker process sees it.
pub(crate) fn ingress() -> Option<ActorRef<IngressMsg>> {
    ractor::pg::get_members(&INGRESS.to_string())
        .into_iter()
        .find(|c: &ActorCell| !c.get_id().is_local())
        .map(ActorRef::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_requests_survive_the_wire_and_damage_is_detected() {
        for r in [
            TaskReply::Done(vec![1, 2, 3, 0], 17),
            TaskReply::Done(Vec::new(), u64::MAX),
            TaskReply::NotLocal,
            TaskReply::Failed("boom".into()),
        ] {
            assert_eq!(TaskReply::from_bytes(r.clone().into_bytes()), r);
        }
        assert_eq!(TaskReply::from_bytes(vec![]), TaskReply::Damaged);
        assert_eq!(TaskReply::from_bytes(vec![9, 1]), TaskReply::Damaged);
        let req = TaskRequest {
            block: BlockId { stream: 3, seq: 77 },
            task: 2,
            range: None,
        };
        assert_eq!(
            Ser::from_bytes(Ser::of(req.clone()).into_bytes()).0,
            Some(req)
        );
        let ranged = TaskRequest {
            block: BlockId {
                stream: 1 << 31,
                seq: 5,
            },
            task: 0,
            range: Some(crate::direct::DirectRange {
                stream: 1 << 31,
                range: crate::direct::OffsetRange {
                    partition: 2,
                    from: 5,
                    until: 9,
                    records: 4,
                },
                identity: Some("1:2:3:ff".into()),
            }),
        };
        assert_eq!(
            Ser::from_bytes(Ser::of(ranged.clone()).into_bytes()).0,
            Some(ranged)
        );
        assert_eq!(Ser::<TaskRequest>::from_bytes(vec![0xff]).0, None);
    }
}
