use bytes::BytesMut;

use super::*;

fn publish_of<'a>(topic: &'a str, payload: &'a [u8], qos: QoS, pkid: u16, properties: &'a [u8]) -> OutgoingPublish<'a> {
    OutgoingPublish {
        topic,
        payload,
        qos,
        pkid,
        dup: false,
        retain: false,
        topic_alias: None,
        message_expiry: None,
        subscription_ids: &[],
        properties,
    }
}

/// A CONNECT of `level` with `properties` (MQTT 5 only) and client id "a".
fn connect_bytes(level: u8, properties: &[u8]) -> BytesMut {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x3c];
    if level == 5 {
        body.push(properties.len() as u8);
        body.extend_from_slice(properties);
    }
    body.extend_from_slice(&[0x00, 0x01, b'a']);
    let mut buf = BytesMut::from(&[0x10, body.len() as u8][..]);
    buf.extend_from_slice(&body);
    buf
}

#[test]
fn reserved_packet_types_are_refused_without_reaching_the_decoder() {
    for version in [Version::V311, Version::V5] {
        for first in [0x00u8, 0xF0] {
            let mut buf = BytesMut::from(&[first, 0x02, 0x00, 0x00][..]);
            let decoded = decode(&mut buf, 1024, Some(version));
            assert!(
                matches!(decoded, Err(FrameError::Malformed(_)) | Ok(Some(Inbound::Auth))),
                "{version:?} {first:#x}: {decoded:?}"
            );
        }
    }
}

#[test]
fn truncated_packets_wait_for_more_bytes() {
    for version in [Some(Version::V311), Some(Version::V5), None] {
        let mut buf = BytesMut::from(&[0x30u8, 0x10, 0x00][..]);
        assert!(matches!(decode(&mut buf, 1024, version), Ok(None)));
        assert_eq!(buf.len(), 3, "nothing consumed");
    }
}

#[test]
fn oversized_packets_are_refused_before_they_are_buffered() {
    for version in [Version::V311, Version::V5] {
        // PUBLISH announcing 2 MiB of remaining length.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            decode(&mut buf, 1024, Some(version)),
            Err(FrameError::TooLarge(_))
        ));
    }
}

#[test]
fn the_connect_picks_the_version() {
    let Some(Inbound::Connect(c)) = decode(&mut connect_bytes(4, &[]), 1024, None).unwrap() else {
        panic!("a CONNECT");
    };
    assert_eq!((c.version, c.client_id.as_str()), (Version::V311, "a"));
    let Some(Inbound::Connect(c)) = decode(&mut connect_bytes(5, &[0x11, 0, 0, 0, 30]), 1024, None).unwrap() else {
        panic!("a CONNECT");
    };
    assert_eq!((c.version, c.session_expiry), (Version::V5, 30));
    assert!(matches!(
        decode(&mut connect_bytes(3, &[]), 1024, None),
        Err(FrameError::UnsupportedProtocolLevel(3))
    ));
}

#[test]
fn a_repeated_or_misplaced_property_is_a_protocol_error() {
    // Session Expiry twice.
    let twice = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    assert!(matches!(
        decode(&mut connect_bytes(5, &twice), 1024, None),
        Err(FrameError::Protocol(_))
    ));
    // Topic Alias is a PUBLISH property, not a CONNECT one.
    assert!(matches!(
        decode(&mut connect_bytes(5, &[0x23, 0, 1]), 1024, None),
        Err(FrameError::Protocol(_))
    ));
    // User properties may repeat.
    let users = [0x26, 0, 1, b'a', 0, 1, b'b', 0x26, 0, 1, b'a', 0, 1, b'c'];
    assert!(matches!(
        decode(&mut connect_bytes(5, &users), 1024, None),
        Ok(Some(Inbound::Connect(_)))
    ));
}

#[test]
fn a_property_longer_than_its_packet_is_malformed() {
    // PUBLISH QoS 0, topic "t", property length 100 with 2 bytes left.
    let mut buf = BytesMut::from(&[0x30u8, 0x06, 0x00, 0x01, b't', 100, 0x01, 0x01][..]);
    assert!(matches!(
        decode(&mut buf, 1024, Some(Version::V5)),
        Err(FrameError::Malformed(_))
    ));
    // A string property whose own length runs past the property list.
    let mut buf = BytesMut::from(&[0x30u8, 0x08, 0x00, 0x01, b't', 0x03, 0x03, 0x00, 0x09, b'x'][..]);
    assert!(matches!(
        decode(&mut buf, 1024, Some(Version::V5)),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn server_only_packets_from_a_client_are_named_not_decoded() {
    for (bytes, name) in [
        (&[0x20u8, 0x03, 0x00, 0x00, 0x00][..], "CONNACK"),
        (&[0x90, 0x04, 0x00, 0x01, 0x00, 0x00][..], "SUBACK"),
        (&[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00][..], "UNSUBACK"),
        (&[0xD0, 0x00][..], "PINGRESP"),
    ] {
        let mut buf = BytesMut::from(bytes);
        let decoded = decode(&mut buf, 1024, Some(Version::V5)).unwrap();
        assert!(
            matches!(decoded, Some(Inbound::ServerOnly(n)) if n == name),
            "{decoded:?}"
        );
    }
}

#[test]
fn mqtt5_only_connack_codes_are_not_sent_to_a_311_client() {
    let mut buf = BytesMut::new();
    let properties = ConnAckProperties::default();
    let connack = Outbound::ConnAck {
        session_present: false,
        code: ReasonCode::BadAuthenticationMethod,
        properties: &properties,
    };
    encode(&connack, Version::V311, &mut buf).unwrap();
    assert_eq!(&buf[..], &[0x20, 0x02, 0x00, 0x03]);
}

#[test]
fn a_publish_round_trips_with_its_qos_packet_id_dup_and_properties() {
    let payload = vec![7u8; 300];
    // A user property ("k", "v") and a content type, as a client would send them.
    let forwarded = bytes::Bytes::from_static(&[0x26, 0, 1, b'k', 0, 1, b'v', 0x03, 0, 4, b't', b'e', b'x', b't']);
    for version in [Version::V311, Version::V5] {
        let mut buf = BytesMut::new();
        for (qos, pkid, dup, retain) in [
            (QoS::AtMostOnce, 0, false, true),
            (QoS::AtLeastOnce, 513, true, false),
            (QoS::ExactlyOnce, 65535, false, true),
        ] {
            let mut publish = publish_of("devices/dev-1/telemetry", &payload, qos, pkid, &forwarded);
            publish.dup = dup;
            publish.retain = retain;
            publish.message_expiry = Some(59);
            encode_publish(&publish, version, &mut buf).unwrap();
            assert_eq!(buf.len(), publish_size(&publish, version));
            let Some(Inbound::Publish(decoded)) = decode(&mut buf, 1024, Some(version)).unwrap() else {
                panic!("a PUBLISH");
            };
            assert_eq!(&decoded.topic[..], b"devices/dev-1/telemetry");
            assert_eq!(&decoded.payload[..], &payload[..]);
            assert_eq!(
                (decoded.qos, decoded.pkid, decoded.dup, decoded.retain),
                (qos, pkid, dup, retain)
            );
            if version == Version::V5 {
                assert_eq!(decoded.properties.message_expiry, Some(59));
                assert_eq!(decoded.properties.forwarded, forwarded);
            } else {
                assert_eq!(decoded.properties, PublishProperties::default());
            }
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn a_publish_with_qos_3_or_cut_short_is_malformed() {
    for version in [Version::V311, Version::V5] {
        let mut qos3 = BytesMut::from(&[0x36u8, 0x05, 0x00, 0x01, b'a', 0x00, 0x01][..]);
        assert!(matches!(
            decode(&mut qos3, 1024, Some(version)),
            Err(FrameError::Malformed(_))
        ));
        // QoS 1, topic length 4 but only 1 byte of topic and no packet id in the frame.
        let mut short = BytesMut::from(&[0x32u8, 0x03, 0x00, 0x04, b'a'][..]);
        assert!(matches!(
            decode(&mut short, 1024, Some(version)),
            Err(FrameError::Malformed(_))
        ));
    }
}

/// A small deterministic generator (xorshift64*), so a failure is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Well-formed MQTT 5 packets of every kind a client sends, with properties, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // CONNECT with properties, a will with properties, user name and password.
    let connect_props = [
        0x11, 0, 0, 0, 60, 0x21, 0, 10, 0x22, 0, 5, 0x27, 0, 0, 1, 0, 0x26, 0, 1, b'k', 0, 1, b'v',
    ];
    let will_props = [
        0x18, 0, 0, 0, 5, 0x01, 1, 0x03, 0, 1, b't', 0x08, 0, 1, b'r', 0x09, 0, 1, 7,
    ];
    let mut body = vec![
        0x00,
        0x04,
        b'M',
        b'Q',
        b'T',
        b'T',
        5,
        0xC6 | 0x08,
        0x00,
        0x3c,
        connect_props.len() as u8,
    ];
    body.extend_from_slice(&connect_props);
    body.extend_from_slice(&[0, 1, b'a', will_props.len() as u8]);
    body.extend_from_slice(&will_props);
    body.extend_from_slice(&[0, 1, b'w', 0, 2, b'h', b'i', 0, 1, b'u', 0, 1, b'p']);
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    out.push(connect);
    // PUBLISH QoS 1 with every property a client may set.
    let props = [
        0x01, 1, 0x02, 0, 0, 0, 9, 0x23, 0, 1, 0x08, 0, 1, b'r', 0x09, 0, 2, 1, 2, 0x26, 0, 1, b'a', 0, 0, 0x03, 0, 1,
        b'c',
    ];
    let mut body = vec![0, 3, b'a', b'/', b'b', 0, 7, props.len() as u8];
    body.extend_from_slice(&props);
    body.extend_from_slice(b"payload");
    let mut publish = vec![0x32, body.len() as u8];
    publish.extend(body);
    out.push(publish);
    // SUBSCRIBE with an identifier and options; UNSUBSCRIBE; the acks with reason codes and
    // properties; DISCONNECT with session expiry; AUTH; PINGREQ.
    out.push(vec![
        0x82, 0x0C, 0, 1, 3, 0x0B, 0x80, 0x01, 0, 3, b'a', b'/', b'#', 0x2D,
    ]);
    out.push(vec![0xA2, 0x06, 0, 2, 0, 0, 1, b'x']);
    for first in [0x40u8, 0x50, 0x62, 0x70] {
        out.push(vec![first, 0x08, 0, 5, 0x80, 4, 0x1F, 0, 1, b'e']);
    }
    out.push(vec![0xE0, 0x07, 0x04, 5, 0x11, 0, 0, 0, 9]);
    out.push(vec![0xF0, 0x05, 0x18, 3, 0x15, 0, 0]);
    out.push(vec![0xC0, 0x00]);
    out
}

/// Hostile bytes never panic the MQTT 5 decoder, never make it take more than it was given, and
/// every packet it returns was whole: mutations of well-formed packets (bytes flipped, cut,
/// inserted, lengths changed) and plain noise, a bounded number of iterations.
#[test]
fn the_mqtt5_decoder_survives_mutated_and_random_input() {
    let seeds = seeds();
    for seed in &seeds {
        let mut buf = BytesMut::from(&seed[..]);
        assert!(
            matches!(decode(&mut buf, 1 << 20, Some(Version::V5)), Ok(Some(_))),
            "seed {seed:02X?} decodes"
        );
    }
    let mut rng = Rng(0x005E_ED0F_F022);
    for _ in 0..200_000 {
        let mut bytes = if rng.below(10) == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..=rng.below(4) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes.truncate(at),
                _ => bytes.insert(at, rng.next() as u8),
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let version = if rng.below(2) == 0 { Some(Version::V5) } else { None };
        for _ in 0..8 {
            let before = buf.len();
            match decode(&mut buf, 4096, version) {
                Ok(Some(_)) => assert!(buf.len() < before, "a packet was taken"),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "nothing taken while waiting for more");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}
