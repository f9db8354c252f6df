//! The subscriber receiver against a real publisher actor.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tributary::{Directive, ReceiverSpec, Store, Strategy, Supervisor};
use tributary_receivers::publisher::{
    PublisherGone, PublisherMsg, SubscriberReceiver, Subscribers,
};

enum FeedMsg {
    Sub(PublisherMsg<String>),
    Push(String, RpcReplyPort<usize>),
    Count(RpcReplyPort<usize>),
}

impl ractor::Message for FeedMsg {}

impl From<PublisherMsg<String>> for FeedMsg {
    fn from(m: PublisherMsg<String>) -> Self {
        FeedMsg::Sub(m)
    }
}

struct Feeder;

impl Actor for Feeder {
    type Msg = FeedMsg;
    type State = Subscribers<String>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<FeedMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Subscribers::default())
    }

    async fn handle(
        &self,
        _: ActorRef<FeedMsg>,
        msg: FeedMsg,
        subs: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FeedMsg::Sub(m) => subs.apply(m),
            FeedMsg::Push(s, reply) => {
                let _ = reply.send(subs.push(&s));
            }
            FeedMsg::Count(reply) => {
                let _ = reply.send(subs.len());
            }
        }
        Ok(())
    }
}

const T: Option<Duration> = Some(Duration::from_secs(10));

async fn count(feeder: &ActorRef<FeedMsg>) -> usize {
    ractor::call_t!(feeder, FeedMsg::Count, 10_000).unwrap()
}

#[tokio::test]
async fn stores_what_the_publisher_pushes_and_unsubscribes_on_stop() {
    let (feeder, _) = Actor::spawn(None, Feeder, ()).await.unwrap();
    let root = Supervisor::start("root", Strategy::default())
        .await
        .unwrap();
    let (store, mut records) = Store::channel(256);
    root.spawn_receiver(ReceiverSpec::new(
        "sub",
        SubscriberReceiver::new(feeder.clone()),
        store,
    ))
    .await
    .unwrap();
    let (store2, mut records2) = Store::channel(256);
    root.spawn_receiver(ReceiverSpec::new(
        "sub2",
        SubscriberReceiver::new(feeder.clone()),
        store2,
    ))
    .await
    .unwrap();

    // Subscription is asynchronous: wait (bounded) until both are registered.
    for _ in 0..200 {
        if count(&feeder).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..100 {
        let reached = ractor::call_t!(feeder, FeedMsg::Push, 10_000, format!("m{i}")).unwrap();
        assert_eq!(reached, 2);
    }
    for r in [&mut records, &mut records2] {
        for i in 0..100 {
            let got = tokio::time::timeout(T.unwrap(), r.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, format!("m{i}"));
        }
    }
    root.shutdown().await.unwrap();
    assert_eq!(count(&feeder).await, 0, "stop hooks unsubscribed");
    feeder.stop(None);
}

#[tokio::test]
async fn a_missing_publisher_is_a_typed_start_failure() {
    let (feeder, handle) = Actor::spawn(None, Feeder, ()).await.unwrap();
    feeder.stop(None);
    handle.await.unwrap();
    let root = Supervisor::start("root", Strategy::default().otherwise(Directive::Stop))
        .await
        .unwrap();
    let (store, _records) = Store::<String>::channel(8);
    let err = root
        .spawn_receiver(ReceiverSpec::new(
            "sub",
            SubscriberReceiver::new(feeder),
            store,
        ))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<PublisherGone>().is_some(), "{err}");
    root.shutdown().await.unwrap();
}
