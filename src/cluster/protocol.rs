//! What the driver and a worker process's executor say to each other: a task is a block id
//! and a task id (the job's code is in both processes), its result the partial's bytes.
//!
//! ```text
//!  driver ──Describe──────────────────► executor ──(job fingerprint, task slots)──►
//!         ──Run(block id, task id)───►          ──Done(partial bytes) | NotLocal | Failed──►
//! ```

use ractor::{ActorCell, ActorRef, BytesConvertable, RpcReplyPort};

use crate::block::BlockId;

/// The process group worker processes' executors join (how the driver finds them).
pub(crate) const EXECUTORS: &str = "tributary.executors";

/// A `serde` value as it crosses processes (`postcard`): `None` if the bytes did not decode
/// (a peer of another version, or damage), which the receiver treats as an error.
#[derive(Debug, Clone)]
pub(crate) struct Ser<T>(pub(crate) Option<T>);

impl<T> Ser<T> {
    pub(crate) fn of(v: T) -> Ser<T> {
        Ser(Some(v))
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> BytesConvertable
    for Ser<T>
{
    fn into_bytes(self) -> Vec<u8> {
        self.0
            .and_then(|v| postcard::to_stdvec(&v).ok())
            .unwrap_or_default()
    }
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Ser(postcard::from_bytes(&bytes).ok())
    }
}

/// What a worker process's executor says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Description {
    /// The fingerprint of the job it was built with
    /// ([`TaskRegistry::fingerprint`](crate::batch::TaskRegistry::fingerprint)).
    pub(crate) fingerprint: u64,
    /// Tasks it runs at once.
    pub(crate) slots: u32,
}

/// Run task `task` over block `block`, which this process's block store should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TaskRequest {
    pub(crate) block: BlockId,
    pub(crate) task: u32,
}

/// How a task ran in a worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskReply {
    /// Its partial result, encoded.
    Done(Vec<u8>),
    /// This process does not hold the block (any more).
    NotLocal,
    /// The task failed (an error or a panic in the job's code), or is not in this job.
    Failed(String),
    /// The reply did not decode.
    Damaged,
}

impl BytesConvertable for TaskReply {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            TaskReply::Done(mut bytes) => {
                // The tag goes last: no copy of a large partial.
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
        }
    }
    fn from_bytes(mut bytes: Vec<u8>) -> Self {
        match bytes.pop() {
            Some(0) => TaskReply::Done(bytes),
            Some(1) if bytes.is_empty() => TaskReply::NotLocal,
            Some(2) => String::from_utf8(bytes).map_or(TaskReply::Damaged, TaskReply::Failed),
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
}

/// The executors of the process `node`, as the driver sees them.
pub(crate) fn executors_of(node: u64) -> Vec<ActorRef<TaskHostMsg>> {
    ractor::pg::get_members(&EXECUTORS.to_string())
        .into_iter()
        .filter(|c: &ActorCell| !c.get_id().is_local() && c.get_id().node() == node)
        .map(ActorRef::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_requests_survive_the_wire_and_damage_is_detected() {
        for r in [
            TaskReply::Done(vec![1, 2, 3, 0]),
            TaskReply::Done(Vec::new()),
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
        };
        assert_eq!(Ser::from_bytes(Ser::of(req).into_bytes()).0, Some(req));
        assert_eq!(Ser::<TaskRequest>::from_bytes(vec![0xff]).0, None);
    }
}
