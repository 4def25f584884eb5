use super::*;
use crate::pki::tests::{test_device, test_pki};

fn policy() -> Policy {
    Policy {
        renew_after: DEFAULT_RENEW_AFTER,
        force: false,
        allowed_key_types: vec![KeyType::EcdsaP256],
        min_interval_s: 60,
        validity: Validity::days(1),
        publish_crl_to: Vec::new(),
    }
}

/// An issuer whose registry holds device `dev-1`, valid from 0 to 3000 (Unix seconds).
fn issuer(dir: &std::path::Path) -> Issuer {
    let mut pki = test_pki(dir);
    pki.registry.record(&[test_device(3000)], false, 0).unwrap();
    Issuer::new(pki, policy())
}

fn request(id: &str, cn: &str) -> Incoming {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    Incoming {
        id: id.parse().unwrap(),
        payload: serde_json::to_vec(&RenewRequest {
            request_id: "r1".into(),
            csr,
        })
        .unwrap(),
    }
}

fn code(answer: &Answer) -> Option<ErrorCode> {
    answer.reply.error.as_ref().map(|e| e.code)
}

#[test]
fn the_window_opens_after_two_thirds_and_the_issuer_says_when() {
    assert_eq!(window_opens(0, 3000, DEFAULT_RENEW_AFTER), 2000);
    let dir = tempfile::tempdir().unwrap();
    let mut issuer = issuer(dir.path());
    let early = issuer.handle(vec![request("dev-1", "dev-1")], 1500);
    assert_eq!(code(&early[0]), Some(ErrorCode::NotDue));
    assert_eq!(early[0].reply.error.as_ref().unwrap().retry_after_s, Some(500));
    // Asking again at once is rate limited, whatever the window says.
    let again = issuer.handle(vec![request("dev-1", "dev-1")], 1510);
    assert_eq!(code(&again[0]), Some(ErrorCode::RateLimited));
    let due = issuer.handle(vec![request("dev-1", "dev-1")], 2100);
    assert!(due[0]
        .reply
        .certificate
        .as_deref()
        .is_some_and(|pem| pem.matches("BEGIN CERTIFICATE").count() == 2));
    let counters = issuer.counters();
    assert_eq!((counters.requests, counters.issued), (3, 1));
    assert!(counters
        .prometheus()
        .contains("renewal_refused_total{code=\"not_due\"} 1\n"));
}

#[test]
fn a_confirmation_revokes_only_what_came_before_and_twice_is_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut issuer = issuer(dir.path());
    issuer.handle(vec![request("dev-1", "dev-1")], 2100);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let records = issuer.pki.registry.list(&Default::default(), now).unwrap();
    let new = records[1].serial.clone();
    let confirm = serde_json::to_vec(&RenewConfirm { serial: new.clone() }).unwrap();
    let id: DeviceId = "dev-1".parse().unwrap();
    assert_eq!(issuer.confirm(&id, &confirm).unwrap(), ["1a2b"]);
    assert!(issuer.confirm(&id, &confirm).unwrap().is_empty());
    let old = serde_json::to_vec(&RenewConfirm { serial: "1a2b".into() }).unwrap();
    assert!(issuer.confirm(&id, &old).unwrap().is_empty());
    assert!(issuer.confirm(&id, b"{}").is_err());
    let records = issuer.pki.registry.list(&Default::default(), now).unwrap();
    assert_eq!(
        (records[0].reason.as_deref(), records[1].status.as_str()),
        (Some("superseded"), "active")
    );
}

#[test]
fn the_renewal_state_follows_the_certificate() {
    let record = |status: &str, successor: Option<&str>| Record {
        id: "dev-1".into(),
        role: "device".into(),
        serial: "1a".into(),
        fingerprint: "00".into(),
        not_before: 0,
        not_after: 3000,
        status: status.into(),
        issued_at: 0,
        revoked_at: None,
        reason: None,
        successor: successor.map(str::to_owned),
        renewal: None,
    };
    let state = |r: &Record, renewed, refusal, now| RenewalState::of(r, renewed, refusal, now);
    assert_eq!(
        state(&record("active", None), false, None, 100),
        Some(RenewalState::Current)
    );
    assert_eq!(
        state(&record("active", None), true, None, 100),
        Some(RenewalState::Renewed)
    );
    assert_eq!(
        state(&record("active", None), false, None, 2500),
        Some(RenewalState::Due)
    );
    assert_eq!(
        state(&record("active", Some("2b")), false, None, 2500),
        Some(RenewalState::Pending)
    );
    assert_eq!(
        state(&record("active", None), false, Some("revoked"), 100),
        Some(RenewalState::Failed)
    );
    assert_eq!(
        state(&record("expired", None), false, None, 4000),
        Some(RenewalState::Overdue)
    );
    assert_eq!(state(&record("revoked", None), false, None, 100), None);
}
