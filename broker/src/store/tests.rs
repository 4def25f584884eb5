use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::message::{Delivery, Message, QoS, SubscriptionOptions};
use crate::router::NEVER_EXPIRES;

fn settings(dir: &Path) -> StoreSettings {
    StoreSettings {
        dir: dir.to_owned(),
        sync: SyncPolicy::Always,
        max_bytes: 1 << 30,
    }
}

fn delivery(topic: &str, payload: &str, qos: QoS) -> Delivery {
    Delivery {
        message: Message::new(topic, payload.as_bytes(), qos, false),
        qos,
        retain: false,
        stored: None,
        subscription_ids: Box::default(),
    }
}

/// A user property ("k", "v"), encoded as an MQTT 5 PUBLISH carries it.
const USER_PROPERTY: &[u8] = &[0x26, 0, 1, b'k', 0, 1, b'v'];

/// Waits (bounded) until `ticket` is durable.
fn wait_durable(store: &Store, ticket: Ticket) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.is_durable(ticket) {
        assert!(
            std::time::Instant::now() < deadline,
            "ticket {ticket:?} never became durable"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn what_is_recorded_comes_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let client: Arc<str> = "service:backend:b1".into();
    let scope: Arc<str> = "services".into();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        retain_as_published: true,
        identifier: Some(268_435_455),
    };
    let mut with_properties = delivery("devices/a/telemetry", "1", QoS::AtLeastOnce);
    with_properties.message = Message::carrying(
        "devices/a/telemetry",
        b"1",
        QoS::AtLeastOnce,
        false,
        USER_PROPERTY,
        Some(600),
    );
    with_properties.subscription_ids = vec![1, 268_435_455].into();
    {
        let (store, recovered) = Store::open(&settings(dir.path())).unwrap();
        assert!(recovered.sessions.is_empty());
        store.session(&client, &scope, 3600);
        store.subscribe(&client, "devices/+/telemetry", &options);
        store.subscribe(&client, "devices/+/gone", &SubscriptionOptions::qos(QoS::AtLeastOnce));
        store.unsubscribe(&client, "devices/+/gone");
        let (first, _) = store.enqueue(&client, &with_properties);
        let (second, _) = store.enqueue(&client, &delivery("devices/a/telemetry", "2", QoS::ExactlyOnce));
        let (third, _) = store.enqueue(&client, &delivery("devices/b/telemetry", "3", QoS::ExactlyOnce));
        store.sent(second, 7);
        store.sent(third, 8);
        store.released(third);
        let (done, _) = store.enqueue(&client, &delivery("devices/c/telemetry", "done", QoS::AtLeastOnce));
        store.remove(done, "devices/c/telemetry".len() + 4);
        store.await_release(&client, 42);
        store.await_release(&client, 43);
        store.release_received(&client, 43);
        store.retain(
            "devices/a/status",
            Some(Message::carrying(
                "devices/a/status",
                b"up",
                QoS::AtLeastOnce,
                true,
                USER_PROPERTY,
                None,
            )),
        );
        store.retain(
            "devices/b/status",
            Some(Message::new("devices/b/status", b"up", QoS::AtMostOnce, true)),
        );
        let last = store.retain("devices/b/status", None);
        wait_durable(&store, last);
        assert!(first < second);
        store.close();
    }
    let (store, recovered) = Store::open(&settings(dir.path())).unwrap();
    assert_eq!(recovered.sessions.len(), 1);
    let session = &recovered.sessions[0];
    assert_eq!(&*session.client, &*client);
    assert_eq!(&*session.share_scope, "services");
    assert_eq!(session.expiry, 3600);
    assert_eq!(session.subscriptions, vec![("devices/+/telemetry".into(), options)]);
    let first = &session.deliveries[0].delivery;
    assert_eq!(
        first.message, with_properties.message,
        "properties and expiry come back"
    );
    assert_eq!(&first.subscription_ids[..], &[1, 268_435_455]);
    assert_eq!(session.awaiting_release, vec![42]);
    let got: Vec<(&[u8], QoS, Option<u16>, bool)> = session
        .deliveries
        .iter()
        .map(|d| (&d.delivery.message.payload[..], d.delivery.qos, d.pkid, d.released))
        .collect();
    assert_eq!(
        got,
        vec![
            (&b"1"[..], QoS::AtLeastOnce, None, false),
            (&b"2"[..], QoS::ExactlyOnce, Some(7), false),
            (&b"3"[..], QoS::ExactlyOnce, Some(8), true),
        ]
    );
    assert_eq!(recovered.retained.len(), 1);
    assert_eq!(&*recovered.retained[0].topic, "devices/a/status");
    assert_eq!(&recovered.retained[0].properties[..], USER_PROPERTY);
    // New ids continue after the recovered ones.
    let (next, _) = store.enqueue(&client, &delivery("devices/a/telemetry", "4", QoS::AtLeastOnce));
    assert!(next > session.deliveries[2].delivery.stored.unwrap());
    store.close();
}

#[test]
fn a_session_that_ends_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let client: Arc<str> = "device:d1".into();
    {
        let (store, _) = Store::open(&settings(dir.path())).unwrap();
        store.session(&client, &client, NEVER_EXPIRES);
        store.subscribe(&client, "devices/d1/cmd/#", &SubscriptionOptions::qos(QoS::AtLeastOnce));
        let (id, _) = store.enqueue(&client, &delivery("devices/d1/cmd/x", "go", QoS::AtLeastOnce));
        store.await_release(&client, 1);
        let last = store.session_gone(&client, vec![id], "devices/d1/cmd/x".len() + 2);
        wait_durable(&store, last);
        store.close();
    }
    let (_store, recovered) = Store::open(&settings(dir.path())).unwrap();
    assert!(recovered.sessions.is_empty());
}

#[test]
fn a_second_broker_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = Store::open(&settings(dir.path())).unwrap();
    let error = Store::open(&settings(dir.path())).err().expect("refused");
    assert!(error.to_string().contains("in use by another broker"), "{error}");
    first.close();
}

#[test]
fn a_file_that_is_not_a_database_is_set_aside_and_the_store_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DATABASE_FILE), vec![0x5a; 64 * 1024]).unwrap();
    let (store, recovered) = Store::open(&settings(dir.path())).unwrap();
    assert!(recovered.sessions.is_empty());
    let kept: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("broker.sqlite.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept for inspection");
    let kept = std::fs::read(dir.path().join(&kept[0])).unwrap();
    assert_eq!(kept, vec![0x5a; 64 * 1024], "as it was");
    store.close();
}

#[test]
fn a_store_that_cannot_be_opened_for_another_reason_is_left_alone_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let client: Arc<str> = "device:d1".into();
    {
        let (store, _) = Store::open(&settings(dir.path())).unwrap();
        store.session(&client, &client, NEVER_EXPIRES);
        let (_, ticket) = store.enqueue(&client, &delivery("devices/d1/cmd/x", "kept", QoS::AtLeastOnce));
        wait_durable(&store, ticket);
        store.close();
    }
    // Something in the way that says nothing about the database itself.
    std::fs::create_dir(dir.path().join("broker.sqlite-shm")).unwrap();
    let error = Store::open(&settings(dir.path())).err().expect("refused");
    assert!(error.to_string().contains("cannot open"), "{error}");
    std::fs::remove_dir(dir.path().join("broker.sqlite-shm")).unwrap();
    let (store, recovered) = Store::open(&settings(dir.path())).unwrap();
    assert_eq!(recovered.sessions[0].deliveries.len(), 1, "the store was not replaced");
    store.close();
}

/// A store written before MQTT 5 (schema 1) is migrated at start: its rows come back with the
/// values 3.1.1 implies (a session that never expires, plain subscriptions, no properties).
#[test]
fn a_schema_1_store_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("broker.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('schema', '1');
             CREATE TABLE sessions (id INTEGER PRIMARY KEY, client TEXT NOT NULL UNIQUE, share_scope TEXT NOT NULL);
             CREATE TABLE subscriptions (session INTEGER NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
                 PRIMARY KEY (session, filter)) WITHOUT ROWID;
             CREATE TABLE deliveries (id INTEGER PRIMARY KEY, session INTEGER NOT NULL, topic TEXT NOT NULL,
                 payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, pkid INTEGER,
                 released INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE awaiting_release (session INTEGER NOT NULL, pkid INTEGER NOT NULL,
                 PRIMARY KEY (session, pkid)) WITHOUT ROWID;
             CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
             INSERT INTO sessions VALUES (1, 'device:d1', 'device:d1');
             INSERT INTO subscriptions VALUES (1, 'devices/d1/cmd/#', 1);
             INSERT INTO deliveries (id, session, topic, payload, qos, retain) VALUES (5, 1, 'devices/d1/cmd/x', X'676f', 1, 0);
             INSERT INTO retained VALUES ('devices/d1/status', X'7570', 0);",
        )
        .unwrap();
    }
    let (store, recovered) = Store::open(&settings(dir.path())).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n.to_string_lossy().contains("damaged")),
        "not taken for damage: {names:?}"
    );
    let session = &recovered.sessions[0];
    assert_eq!((&*session.client, session.expiry), ("device:d1", NEVER_EXPIRES));
    assert_eq!(
        session.subscriptions,
        vec![("devices/d1/cmd/#".into(), SubscriptionOptions::qos(QoS::AtLeastOnce))]
    );
    let delivery = &session.deliveries[0].delivery;
    assert_eq!(
        (&delivery.message.payload[..], delivery.message.expires_at),
        (&b"go"[..], None)
    );
    assert!(delivery.message.properties.is_empty() && delivery.subscription_ids.is_empty());
    assert_eq!(&recovered.retained[0].payload[..], b"up");
    store.close();
    let conn = rusqlite::Connection::open(dir.path().join("broker.sqlite")).unwrap();
    let version: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, "2");
}
