//! The router on its own: sessions attached, detached and taken over, messages routed, queues
//! at their bounds, with plain wakers and no runtime.

use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use super::*;
use crate::reason::KickReason;

fn limits() -> Limits {
    Limits {
        max_queued_messages: 10,
        max_queued_bytes: 1 << 20,
        max_inflight: 5,
        slow_subscriber_timeout: Duration::from_millis(50),
        max_subscriptions: 8,
        max_retained_messages: 100,
        max_retained_bytes: 1 << 20,
    }
}

fn router() -> Router {
    Router::new(limits(), Audit::new(Arc::new(Metrics::default())), None)
}

fn key(client: &str) -> SessionKey {
    SessionKey {
        client: client.into(),
        share_scope: "services".into(),
    }
}

/// A 3.1.1 client's session expiry: none for a clean session, never ending otherwise.
fn expiry(clean: bool) -> u32 {
    if clean {
        0
    } else {
        NEVER_EXPIRES
    }
}

fn attach(router: &Router, client: &str, clean: bool) -> (Attached, Arc<Kick>) {
    let kick = Arc::new(Kick::default());
    (router.attach(key(client), clean, expiry(clean), kick.clone(), 5), kick)
}

/// What a connection would write now: (topic, payload, qos, pkid, dup) per PUBLISH.
fn drain(attached: &Attached) -> Vec<(String, String, QoS, u16, bool)> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        let handed = attached.poll_outgoing(&mut cx, 64, &mut None, &mut |o| {
            if let Outgoing::Publish { delivery, pkid, dup } = o {
                out.push((
                    delivery.message.topic.to_string(),
                    String::from_utf8_lossy(&delivery.message.payload).into_owned(),
                    delivery.qos,
                    pkid,
                    dup,
                ));
            }
        });
        if handed == 0 {
            return out;
        }
    }
}

fn publish(router: &Router, topic: &str, payload: &str, qos: QoS) -> Publication {
    router.publish(Message::new(topic, payload.as_bytes(), qos, false))
}

#[test]
fn delivery_is_at_the_lower_qos_and_overlapping_subscriptions_give_one_copy() {
    let router = router();
    let (sub, _) = attach(&router, "sub", true);
    sub.subscribe("a/+", SubscriptionOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    sub.subscribe("a/#", SubscriptionOptions::qos(QoS::ExactlyOnce))
        .unwrap();
    sub.subscribe("b", SubscriptionOptions::qos(QoS::AtMostOnce)).unwrap();
    assert!(publish(&router, "a/x", "1", QoS::ExactlyOnce).is_complete());
    assert!(publish(&router, "b", "2", QoS::ExactlyOnce).is_complete());
    let got = drain(&sub);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].2, got[1].2), (QoS::ExactlyOnce, QoS::AtMostOnce));
    let (_, s) = sub.session.queued();
    assert_eq!(s, 1, "the QoS 2 delivery is inflight");
}

#[test]
fn a_full_online_queue_makes_publications_wait_and_drops_qos0_only_once_the_subscriber_is_slow() {
    let router = router();
    let (sub, kick) = attach(&router, "sub", true);
    sub.subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
    for n in 0..10 {
        assert!(publish(&router, "t", &n.to_string(), QoS::AtLeastOnce).is_complete());
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut blocked = publish(&router, "t", "10", QoS::AtLeastOnce);
    assert!(blocked.poll(&mut cx).is_pending());
    let mut qos0 = publish(&router, "t", "qos0", QoS::AtMostOnce);
    assert!(
        qos0.poll(&mut cx).is_pending(),
        "QoS 0 waits too while the subscriber may catch up"
    );
    // The subscriber takes 5 (its inflight bound): room for both.
    assert_eq!(drain(&sub).len(), 5);
    assert!(blocked.poll(&mut cx).is_ready() && qos0.poll(&mut cx).is_ready());
    assert_eq!(sub.session.queued(), (7, 5));
    // Full again, and for longer than the timeout: QoS 0 is dropped (counted), not the subscriber.
    for n in 0..3 {
        assert!(publish(&router, "t", &format!("more {n}"), QoS::AtLeastOnce).is_complete());
    }
    let mut late = publish(&router, "t", "late qos0", QoS::AtMostOnce);
    assert!(late.poll(&mut cx).is_pending());
    std::thread::sleep(Duration::from_millis(60));
    assert!(late.poll(&mut cx).is_ready());
    assert!(publish(&router, "t", "dropped at once", QoS::AtMostOnce).is_complete());
    assert_eq!(router.env().metrics.dropped_so_far(DropReason::Qos0SubscriberFull), 2);
    assert_eq!(kick.reason(), None, "QoS 0 never disconnects a subscriber");
}

#[test]
fn a_subscriber_full_past_the_timeout_is_kicked_and_its_persistent_session_queues_offline() {
    let router = router();
    let (sub, kick) = attach(&router, "sub", false);
    sub.subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
    for n in 0..10 {
        assert!(publish(&router, "t", &n.to_string(), QoS::AtLeastOnce).is_complete());
    }
    let mut blocked = publish(&router, "t", "late", QoS::AtLeastOnce);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(blocked.poll(&mut cx).is_pending());
    std::thread::sleep(Duration::from_millis(60));
    assert!(blocked.poll(&mut cx).is_ready());
    assert_eq!(kick.reason(), Some(KickReason::SlowSubscriber));
    drop(sub);
    // Offline: the oldest go beyond the bound, counted.
    for n in 0..5 {
        assert!(publish(&router, "t", &format!("offline {n}"), QoS::AtLeastOnce).is_complete());
    }
    assert_eq!(router.env().metrics.dropped_so_far(DropReason::QueueOverflow), 6);
    let (back, _) = attach(&router, "sub", false);
    assert!(back.session_present());
    let got: Vec<String> = drain(&back).into_iter().map(|m| m.1).collect();
    assert_eq!(got[..5], ["6", "7", "8", "9", "late"]);
    assert_eq!(got.len(), 5, "the inflight bound");
    assert_eq!(back.session.queued(), (5, 5));
}

#[test]
fn a_clean_session_takes_over_and_discards_a_persistent_one() {
    let router = router();
    let (first, first_kick) = attach(&router, "c", false);
    first
        .subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    let (second, _) = attach(&router, "c", true);
    assert_eq!(first_kick.reason(), Some(KickReason::TakenOver));
    assert!(!second.session_present());
    drop(first);
    assert!(publish(&router, "t", "x", QoS::AtLeastOnce).is_complete());
    assert!(
        drain(&second).is_empty(),
        "the old subscription went with the old session"
    );
    drop(second);
    assert!(router.sessions().is_empty(), "a clean session leaves nothing behind");
}

#[test]
fn unacknowledged_deliveries_are_resent_with_dup_after_a_reconnect() {
    let router = router();
    let (sub, _) = attach(&router, "p", false);
    sub.subscribe("t", SubscriptionOptions::qos(QoS::ExactlyOnce)).unwrap();
    for (payload, qos) in [
        ("one", QoS::AtLeastOnce),
        ("two", QoS::ExactlyOnce),
        ("three", QoS::ExactlyOnce),
    ] {
        assert!(publish(&router, "t", payload, qos).is_complete());
    }
    let first = drain(&sub);
    assert!(first.iter().all(|m| !m.4));
    // "three" got as far as PUBREC: after the reconnect it gets PUBREL, not PUBLISH.
    assert!(sub.pubrec(first[2].3).is_some());
    drop(sub);
    let (back, _) = attach(&router, "p", false);
    let mut cx = Context::from_waker(Waker::noop());
    let mut resent = Vec::new();
    back.poll_outgoing(&mut cx, 64, &mut None, &mut |o| match o {
        Outgoing::Publish { delivery, pkid, dup } => resent.push(format!(
            "{}:{pkid}:{dup}",
            String::from_utf8_lossy(&delivery.message.payload)
        )),
        Outgoing::PubRel(pkid) => resent.push(format!("PUBREL:{pkid}")),
    });
    assert_eq!(
        resent,
        [
            format!("one:{}:true", first[0].3),
            format!("two:{}:true", first[1].3),
            format!("PUBREL:{}", first[2].3)
        ]
    );
    assert!(
        back.puback(first[0].3)
            && back.pubrec(first[1].3).is_some()
            && back.pubcomp(first[1].3)
            && back.pubcomp(first[2].3)
    );
    assert_eq!(back.session.queued(), (0, 0));
}

#[test]
fn a_qos2_resend_is_routed_once_and_unreleased_ones_are_bounded() {
    let router = router();
    let (publisher, _) = attach(&router, "pub", false);
    assert_eq!(publisher.receive_exactly_once(7, &mut Ticket::default()), Ok(true));
    assert_eq!(
        publisher.receive_exactly_once(7, &mut Ticket::default()),
        Ok(false),
        "a resend before PUBREL"
    );
    publisher.release(7);
    assert_eq!(
        publisher.receive_exactly_once(7, &mut Ticket::default()),
        Ok(true),
        "released: a new message"
    );
    for pkid in 8..12 {
        assert_eq!(publisher.receive_exactly_once(pkid, &mut Ticket::default()), Ok(true));
    }
    assert_eq!(
        publisher.receive_exactly_once(12, &mut Ticket::default()),
        Err(TooManyUnreleased)
    );
}

#[test]
fn shared_groups_are_scoped_and_each_message_goes_to_one_member() {
    let router = router();
    let member = |client: &str, scope: &str| {
        let key = SessionKey {
            client: client.into(),
            share_scope: scope.into(),
        };
        let attached = router.attach(key, true, 0, Arc::new(Kick::default()), 5);
        attached
            .subscribe("$share/workers/jobs/+", SubscriptionOptions::qos(QoS::AtMostOnce))
            .unwrap();
        attached
    };
    let (a, b) = (member("svc-a", "services"), member("svc-b", "services"));
    let device = member("device:dev-1", "device:dev-1");
    for n in 0..10 {
        assert!(publish(&router, &format!("jobs/{n}"), "x", QoS::AtMostOnce).is_complete());
    }
    let (got_a, got_b) = (drain(&a).len(), drain(&b).len());
    assert_eq!(got_a + got_b, 10, "each job to one service");
    assert!(got_a > 0 && got_b > 0, "round robin: {got_a} and {got_b}");
    assert_eq!(drain(&device).len(), 10, "the device's group is its own");
}

#[test]
fn retained_messages_follow_a_new_subscription_once_each() {
    let router = router();
    for topic in ["r/a", "r/b", "other"] {
        let message = Message::new(topic, b"kept", QoS::AtLeastOnce, true);
        assert!(router.publish(message).is_complete());
    }
    let (sub, _) = attach(&router, "late", true);
    sub.subscribe("r/+", SubscriptionOptions::qos(QoS::AtMostOnce)).unwrap();
    sub.subscribe("r/#", SubscriptionOptions::qos(QoS::AtLeastOnce))
        .unwrap();
    let mut backlog = sub.retained_for(&[
        ("r/+", SubscriptionOptions::qos(QoS::AtMostOnce)),
        ("r/#", SubscriptionOptions::qos(QoS::AtLeastOnce)),
    ]);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(backlog.poll(&mut cx).is_ready());
    let mut got = Vec::new();
    sub.poll_outgoing(&mut cx, 64, &mut None, &mut |o| {
        if let Outgoing::Publish { delivery, .. } = o {
            got.push((delivery.message.topic.to_string(), delivery.qos, delivery.retain));
        }
    });
    got.sort();
    assert_eq!(
        got,
        [
            ("r/a".to_string(), QoS::AtLeastOnce, true),
            ("r/b".to_string(), QoS::AtLeastOnce, true)
        ]
    );
    // An empty retained payload deletes.
    assert!(router
        .publish(Message::new("r/a", b"", QoS::AtMostOnce, true))
        .is_complete());
    assert_eq!(router.retained().size().0, 2);
}

#[test]
fn subscriptions_per_session_are_bounded() {
    let router = router();
    let (sub, _) = attach(&router, "s", true);
    for n in 0..8 {
        sub.subscribe(&format!("t/{n}"), SubscriptionOptions::qos(QoS::AtMostOnce))
            .unwrap();
    }
    sub.subscribe("t/0", SubscriptionOptions::qos(QoS::AtLeastOnce))
        .expect("replacing one is not adding one");
    assert_eq!(
        sub.subscribe("t/8", SubscriptionOptions::qos(QoS::AtMostOnce)),
        Err(SubscribeRefused::TooManySubscriptions)
    );
    assert!(sub.unsubscribe("t/1"));
    assert!(!sub.unsubscribe("never"));
    sub.subscribe("t/8", SubscriptionOptions::qos(QoS::AtMostOnce)).unwrap();
}

#[test]
fn many_subscribers_under_one_level_each_get_their_own_and_leave_no_trace() {
    let router = router();
    let sessions: Vec<Attached> = (0..40)
        .map(|n| {
            let (attached, _) = attach(&router, &format!("device:d{n}"), true);
            attached
                .subscribe(&format!("devices/d{n}/cmd"), SubscriptionOptions::qos(QoS::AtLeastOnce))
                .unwrap();
            attached
        })
        .collect();
    for n in 0..40 {
        assert!(publish(&router, &format!("devices/d{n}/cmd"), &n.to_string(), QoS::AtLeastOnce).is_complete());
    }
    for (n, session) in sessions.iter().enumerate() {
        let got = drain(session);
        assert_eq!(got.len(), 1, "d{n}: {got:?}");
        assert_eq!(got[0].1, n.to_string());
    }
    for (n, session) in sessions.iter().enumerate() {
        assert!(session.unsubscribe(&format!("devices/d{n}/cmd")));
    }
    let tree = router.shared.tree.read().unwrap();
    let mut targets = Vec::new();
    tree.matches("devices/d1/cmd", None, &mut targets);
    assert!(
        targets.is_empty() && tree.is_empty(),
        "every node went with its last subscription"
    );
}

#[test]
fn a_message_too_big_for_the_queue_left_waits_for_room_without_spinning() {
    let limits = Limits {
        max_queued_bytes: 100,
        ..limits()
    };
    let router = Router::new(limits, Audit::new(Arc::new(Metrics::default())), None);
    let (sub, _) = attach(&router, "sub", true);
    sub.subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
    assert!(publish(&router, "t", &"a".repeat(80), QoS::AtLeastOnce).is_complete());
    // 81 + 41 bytes would pass the bound: the second waits (a zero-byte check said "room").
    let mut waiting = publish(&router, "t", &"b".repeat(40), QoS::AtLeastOnce);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(waiting.poll(&mut cx).is_pending());
    assert!(waiting.deadline().is_some());
    drain(&sub);
    assert!(waiting.poll(&mut cx).is_ready());
}

#[tokio::test]
async fn finishing_a_publication_kicks_a_stuck_subscriber_at_its_deadline() {
    let router = router();
    let (sub, kick) = attach(&router, "sub", false);
    sub.subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
    for n in 0..10 {
        assert!(publish(&router, "t", &n.to_string(), QoS::AtLeastOnce).is_complete());
    }
    let waiting = publish(&router, "t", "last", QoS::AtLeastOnce);
    assert!(!waiting.is_complete());
    tokio::time::timeout(Duration::from_secs(5), waiting.finish())
        .await
        .expect("finished once the subscriber's time ran out");
    assert_eq!(kick.reason(), Some(KickReason::SlowSubscriber));
}

mod properties {
    use std::collections::BTreeMap;

    use fleet_identity::{Identity, Role};
    use proptest::prelude::*;

    use super::*;
    use crate::acl::{AclConfig, Verdict};
    use crate::topic::matches;

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("devices"),
            Just("d1"),
            Just("d2"),
            Just("cmd"),
            Just("t"),
            Just("$SYS")
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..4).prop_map(|levels| levels.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![4 => level().prop_map(str::to_owned), 1 => Just("+".to_owned())];
        (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".into());
            }
            levels.join("/")
        })
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
    }

    fn roomy() -> Router {
        let limits = Limits {
            max_queued_messages: 100_000,
            max_queued_bytes: usize::MAX / 2,
            max_inflight: 1000,
            slow_subscriber_timeout: Duration::from_secs(3600),
            ..super::limits()
        };
        Router::new(limits, Audit::new(Arc::new(Metrics::default())), None)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// What each session receives is exactly the messages whose topic matches one of its
        /// filters, one copy at the best QoS; and a device, subscribing only what the ACL
        /// allows, receives nothing its templates do not cover.
        #[test]
        fn every_delivery_matches_an_allowed_subscription(
            subscriptions in prop::collection::vec((0..3usize, filter(), qos()), 1..12),
            publishes in prop::collection::vec((topic(), qos()), 1..30),
        ) {
            let router = roomy();
            let acl = AclConfig::default();
            let identity = |n: usize| Identity { role: Role::Device, id: format!("d{n}").parse().unwrap() };
            let sessions: Vec<Attached> = (0..3).map(|n| attach(&router, &format!("device:d{n}"), true).0).collect();
            let mut allowed: Vec<Vec<(String, QoS)>> = vec![Vec::new(); 3];
            for (n, filter, qos) in subscriptions {
                if acl.for_identity(&identity(n)).may_subscribe(&filter) == Verdict::Allowed {
                    sessions[n].subscribe(&filter, SubscriptionOptions::qos(qos)).unwrap();
                    allowed[n].retain(|(f, _)| *f != filter);
                    allowed[n].push((filter, qos));
                }
            }
            for (i, (topic, qos)) in publishes.iter().enumerate() {
                prop_assert!(publish(&router, topic, &i.to_string(), *qos).is_complete());
            }
            for (n, session) in sessions.iter().enumerate() {
                let got: BTreeMap<String, QoS> = drain(session).into_iter().map(|m| (m.1, m.2)).collect();
                let mut expected = BTreeMap::new();
                for (i, (topic, qos)) in publishes.iter().enumerate() {
                    let best = allowed[n].iter().filter(|(f, _)| matches(f, topic)).map(|(_, q)| *q).max();
                    if let Some(granted) = best {
                        expected.insert(i.to_string(), (*qos).min(granted));
                        prop_assert!(topic.starts_with(&format!("devices/d{n}")), "{topic} reached d{n}");
                    }
                }
                prop_assert_eq!(got, expected);
            }
        }

        /// QoS 1 to a persistent session arrives at least once, in order, whatever its
        /// connections do in between: drain some, acknowledge some, drop the connection.
        #[test]
        fn qos1_survives_random_disconnects_of_a_persistent_session(
            steps in prop::collection::vec(0..4u8, 1..80),
        ) {
            let router = roomy();
            let (publisher, _) = attach(&router, "publisher", true);
            let mut subscriber = Some(attach(&router, "sub", false).0);
            subscriber.as_ref().unwrap().subscribe("t", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
            let (mut sent, mut received, mut unacked) = (0u32, Vec::new(), Vec::new());
            for step in steps {
                match (step, &subscriber) {
                    (0, _) => {
                        prop_assert!(publish(&router, "t", &sent.to_string(), QoS::AtLeastOnce).is_complete());
                        sent += 1;
                    }
                    (1, Some(sub)) => {
                        for m in drain(sub) {
                            received.push(m.1.parse::<u32>().unwrap());
                            unacked.push(m.3);
                        }
                    }
                    (2, Some(sub)) => {
                        if let Some(pkid) = unacked.pop() {
                            sub.puback(pkid);
                        }
                    }
                    (3, Some(_)) => {
                        subscriber = None;
                        unacked.clear();
                    }
                    (_, None) => subscriber = Some(attach(&router, "sub", false).0),
                    _ => {}
                }
            }
            let sub = subscriber.unwrap_or_else(|| attach(&router, "sub", false).0);
            for pkid in unacked {
                sub.puback(pkid);
            }
            loop {
                let got = drain(&sub);
                if got.is_empty() {
                    break;
                }
                for m in got {
                    received.push(m.1.parse::<u32>().unwrap());
                    prop_assert!(sub.puback(m.3));
                }
            }
            let firsts: Vec<u32> = received.iter().fold(Vec::new(), |mut seen, n| {
                if !seen.contains(n) {
                    seen.push(*n);
                }
                seen
            });
            prop_assert_eq!(firsts, (0..sent).collect::<Vec<_>>());
            drop(publisher);
        }

        /// Several publishers into a small queue: publications wait for room, none is lost,
        /// and each publisher's messages arrive in its order.
        #[test]
        fn order_is_kept_per_publisher_through_a_full_queue(
            steps in prop::collection::vec((0..3usize, any::<bool>()), 1..120),
        ) {
            let limits = Limits {
                max_queued_messages: 3,
                max_inflight: 2,
                slow_subscriber_timeout: Duration::from_secs(3600),
                ..super::limits()
            };
            let router = Router::new(limits, Audit::new(Arc::new(Metrics::default())), None);
            let (sub, _) = attach(&router, "sub", true);
            sub.subscribe("from/+", SubscriptionOptions::qos(QoS::AtLeastOnce)).unwrap();
            let mut pending: Vec<Option<Publication>> = vec![None, None, None];
            let mut next = [0u32; 3];
            let mut order: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
            let mut cx = Context::from_waker(Waker::noop());
            let take = |sub: &Attached, order: &mut BTreeMap<usize, Vec<u32>>| {
                for m in drain(sub) {
                    let from: usize = m.0.trim_start_matches("from/").parse().unwrap();
                    order.entry(from).or_default().push(m.1.parse().unwrap());
                    sub.puback(m.3);
                }
            };
            for (who, drain_now) in steps {
                if drain_now {
                    take(&sub, &mut order);
                }
                if let Some(waiting) = &mut pending[who] {
                    if waiting.poll(&mut cx).is_pending() {
                        continue;
                    }
                }
                pending[who] = Some(publish(&router, &format!("from/{who}"), &next[who].to_string(), QoS::AtLeastOnce));
                next[who] += 1;
            }
            for _ in 0..1000 {
                take(&sub, &mut order);
                for slot in pending.iter_mut() {
                    if slot.as_mut().is_some_and(|w| w.poll(&mut cx).is_ready()) {
                        *slot = None;
                    }
                }
                if pending.iter().all(Option::is_none) && sub.session.queued() == (0, 0) {
                    break;
                }
            }
            for (who, sent) in next.iter().enumerate() {
                let got = order.remove(&who).unwrap_or_default();
                prop_assert_eq!(got, (0..*sent).collect::<Vec<_>>(), "publisher {}", who);
            }
        }
    }
}

/// A client that reconnects in a loop to a session with an expiry leaves one entry at most in
/// the expiry schedule, however often it comes and goes.
#[test]
fn the_expiry_schedule_holds_one_entry_per_session() {
    let router = router();
    for _ in 0..50 {
        let attached = router.attach(key("looping"), false, 3600, Arc::new(Kick::default()), 5);
        drop(attached);
    }
    assert_eq!(router.expiring().len(), 1);
    let attached = router.attach(key("looping"), false, 3600, Arc::new(Kick::default()), 5);
    assert_eq!(router.expiring().len(), 0, "resumed: off the schedule");
    drop(attached);
    assert_eq!(router.expire_sessions(Instant::now() + Duration::from_secs(3601)), 1);
    assert_eq!(router.expiring().len(), 0);
}
