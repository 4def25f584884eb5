//! The certificate renewal protocol over MQTT, in one place, so the issuing service
//! (`provision serve`) and the device agent cannot disagree about topics, payloads or codes.
//!
//! Every topic lies under `devices/<id>/`, which the broker's default device ACL
//! (`devices/{id}/#` both ways) already grants to device `<id>` alone: the topic a request
//! arrives on therefore names the authenticated requester, and no ACL change is needed. The
//! issuer is a service (services may use every topic by default).
//!
//! | topic | from | payload |
//! |---|---|---|
//! | `devices/<id>/renew/request` | device | [`RenewRequest`]: `request_id`, `csr` (PEM) |
//! | `devices/<id>/renew/reply` | issuer | [`RenewReply`]: `request_id` and `certificate` (PEM chain) or `error` |
//! | `devices/<id>/renew/confirm` | device, retained | [`RenewConfirm`]: `serial` of the certificate it now connects with |
//!
//! The confirmation is published retained (QoS 1) on the first connection made with the new
//! certificate, so an issuer that was down at that moment still receives it when it next
//! subscribes; processing it twice changes nothing.

use serde::{Deserialize, Serialize};

/// The largest request payload an issuer reads: a CSR of the largest allowed key is under 2 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The longest `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// The subscription filter of an issuer for every device's requests.
pub const REQUEST_FILTER: &str = "devices/+/renew/request";

/// The subscription filter of an issuer for every device's confirmations.
pub const CONFIRM_FILTER: &str = "devices/+/renew/confirm";

/// The three topics of the protocol, below `devices/<id>/renew/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewalTopic {
    /// The device asks for a certificate.
    Request,
    /// The issuer answers.
    Reply,
    /// The device says which certificate it now connects with.
    Confirm,
}

impl RenewalTopic {
    fn leaf(self) -> &'static str {
        match self {
            RenewalTopic::Request => "request",
            RenewalTopic::Reply => "reply",
            RenewalTopic::Confirm => "confirm",
        }
    }

    /// The topic suffix below `devices/<id>/` (what the agent's topic rules take).
    pub fn suffix(self) -> String {
        format!("renew/{}", self.leaf())
    }

    /// The full topic for device `id`.
    pub fn topic(self, id: &str) -> String {
        format!("devices/{id}/renew/{}", self.leaf())
    }

    /// The device id and topic kind of a full topic of this protocol, if it is one.
    pub fn parse(topic: &str) -> Option<(&str, Self)> {
        let rest = topic.strip_prefix("devices/")?;
        let (id, leaf) = rest.split_once("/renew/")?;
        let kind = [RenewalTopic::Request, RenewalTopic::Reply, RenewalTopic::Confirm]
            .into_iter()
            .find(|kind| kind.leaf() == leaf)?;
        (!id.is_empty() && !id.contains('/')).then_some((id, kind))
    }
}

/// A device's request for a new certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// Chosen by the device (1 to [`MAX_REQUEST_ID_LEN`] printable ASCII characters), echoed in
    /// the reply so a late answer to an earlier request is recognised and ignored.
    pub request_id: String,
    /// A PKCS#10 request, PEM: subject CN = the device id, signed by the new key.
    pub csr: String,
}

/// The issuer's answer: exactly one of `certificate` and `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewReply {
    /// The request's id.
    pub request_id: String,
    /// The new certificate then the device CA's certificate, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Why no certificate was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RenewError>,
}

/// A refusal a device can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewError {
    /// What went wrong.
    pub code: ErrorCode,
    /// The same in words, for logs.
    pub message: String,
    /// Ask again no sooner than this many seconds from now (absent: see [`ErrorCode::is_final`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

/// The error codes of a refusal. A device retries the same request only after `retry_after_s`
/// for the codes that are not final, and for a final one does not retry before an operator acts
/// (our agent retries at its longest backoff, with a new key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not a request of this protocol (JSON, fields, sizes).
    BadRequest,
    /// The CSR's CN or SAN names another id than the topic's device.
    IdMismatch,
    /// The CSR's signature does not verify (tampered, or not signed by its key).
    BadSignature,
    /// The CSR's key type is not one the issuer signs.
    KeyTypeNotAllowed,
    /// The registry knows no certificate of this device.
    UnknownDevice,
    /// Every certificate of this device is revoked.
    Revoked,
    /// The current certificate is not yet in its renewal window (`retry_after_s`: when it is).
    NotDue,
    /// Asked too often (`retry_after_s`: when it may ask again).
    RateLimited,
    /// The issuer could not complete the request (registry busy or failing): retry later.
    Unavailable,
    /// A code this device does not know (from a newer issuer): treated as [`ErrorCode::Unavailable`].
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code's word, as on the wire and in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::IdMismatch => "id_mismatch",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::KeyTypeNotAllowed => "key_type_not_allowed",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::Revoked => "revoked",
            ErrorCode::NotDue => "not_due",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Whether asking again unchanged cannot succeed until an operator acts.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ErrorCode::BadRequest
                | ErrorCode::IdMismatch
                | ErrorCode::BadSignature
                | ErrorCode::KeyTypeNotAllowed
                | ErrorCode::UnknownDevice
                | ErrorCode::Revoked
        )
    }

    /// Every code, for documentation checks and counters.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::IdMismatch,
        ErrorCode::BadSignature,
        ErrorCode::KeyTypeNotAllowed,
        ErrorCode::UnknownDevice,
        ErrorCode::Revoked,
        ErrorCode::NotDue,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];
}

/// A device's word that it connected (CONNACK 0) with the certificate of `serial`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewConfirm {
    /// The new certificate's serial, hex.
    pub serial: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_the_device_and_parse_back() {
        assert_eq!(RenewalTopic::Request.topic("pump-1"), "devices/pump-1/renew/request");
        assert_eq!(
            RenewalTopic::parse("devices/pump-1/renew/confirm"),
            Some(("pump-1", RenewalTopic::Confirm))
        );
        for other in [
            "devices/pump-1/renew/other",
            "devices//renew/request",
            "devices/a/b/renew/request",
            "elsewhere/pump-1/renew/request",
        ] {
            assert_eq!(RenewalTopic::parse(other), None, "{other}");
        }
    }

    #[test]
    fn replies_carry_a_certificate_or_an_error_and_unknown_codes_are_not_fatal() {
        let reply: RenewReply =
            serde_json::from_str(r#"{"request_id":"r1","error":{"code":"from_the_future","message":"?"}}"#).unwrap();
        assert_eq!(reply.error.unwrap().code, ErrorCode::Unknown);
        let ok = RenewReply {
            request_id: "r2".into(),
            certificate: Some("PEM".into()),
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"request_id":"r2","certificate":"PEM"}"#
        );
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
