//! The README cannot drift: its troubleshooting tables cover every reason the broker logs and
//! every diagnosis `device-agent check` gives, and every flag in its command lines exists.

use std::process::Command;

use broker::metrics::DropReason;
use broker::reason::{KickReason, RejectReason, SessionEnd, Violation};
use device_agent::diagnosis::Diagnosis;
use e2e::{run_ok, workspace_bin};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md")
}

/// Every diagnosis; the match has no wildcard, so a new variant fails to compile until it is
/// listed here (and then this test demands it in the README).
fn every_diagnosis() -> Vec<Diagnosis> {
    let all = vec![
        Diagnosis::Ok,
        Diagnosis::LocalProblem(String::new()),
        Diagnosis::Impersonation,
        Diagnosis::NameMismatch,
        Diagnosis::PinMismatch,
        Diagnosis::BrokerCertificateInvalid(String::new()),
        Diagnosis::OurCertificateExpired,
        Diagnosis::OurCertificateRevoked,
        Diagnosis::OurCertificateRefused(String::new()),
        Diagnosis::ClientIdRefused,
        Diagnosis::Unreachable(String::new()),
        Diagnosis::Other(String::new()),
    ];
    for diagnosis in &all {
        match diagnosis {
            Diagnosis::Ok
            | Diagnosis::LocalProblem(_)
            | Diagnosis::Impersonation
            | Diagnosis::NameMismatch
            | Diagnosis::PinMismatch
            | Diagnosis::BrokerCertificateInvalid(_)
            | Diagnosis::OurCertificateExpired
            | Diagnosis::OurCertificateRevoked
            | Diagnosis::OurCertificateRefused(_)
            | Diagnosis::ClientIdRefused
            | Diagnosis::Unreachable(_)
            | Diagnosis::Other(_) => {}
        }
    }
    all
}

/// Every way a session ends; exhaustive like [`every_diagnosis`].
fn every_session_end() -> Vec<SessionEnd> {
    let all = vec![
        SessionEnd::ClientDisconnect,
        SessionEnd::ClientDisconnectWithWill,
        SessionEnd::PeerClosed,
        SessionEnd::KeepaliveTimeout,
        SessionEnd::Protocol(Violation::Protocol, String::new()),
        SessionEnd::AclDisconnect,
        SessionEnd::Kicked(KickReason::Revoked),
        SessionEnd::Kicked(KickReason::TakenOver),
        SessionEnd::Kicked(KickReason::SlowSubscriber),
        SessionEnd::Kicked(KickReason::Shutdown),
        SessionEnd::Io(String::new()),
    ];
    for end in &all {
        match end {
            SessionEnd::ClientDisconnect
            | SessionEnd::ClientDisconnectWithWill
            | SessionEnd::PeerClosed
            | SessionEnd::KeepaliveTimeout
            | SessionEnd::Protocol(..)
            | SessionEnd::AclDisconnect
            | SessionEnd::Io(_) => {}
            SessionEnd::Kicked(kick) => match kick {
                KickReason::Revoked | KickReason::TakenOver | KickReason::SlowSubscriber | KickReason::Shutdown => {}
            },
        }
    }
    all
}

#[test]
fn the_troubleshooting_table_covers_every_reject_reason_and_check_outcome() {
    let readme = readme();
    let ends = every_session_end();
    let words = RejectReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(ends.iter().map(SessionEnd::as_str))
        .chain(DropReason::ALL.iter().map(|r| r.as_str()));
    for word in words {
        assert!(
            readme.contains(&format!("| `{word}` |")),
            "README's troubleshooting tables lack `{word}`"
        );
    }
    for diagnosis in every_diagnosis() {
        let row = format!("| {} |", diagnosis.exit_code());
        assert!(
            readme.contains(&row),
            "README's check table lacks exit code {} ({diagnosis:?})",
            diagnosis.exit_code()
        );
    }
}

#[test]
fn every_flag_in_the_readme_exists() {
    let readme = readme();
    let mut checked = 0;
    for line in readme.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (binary, sub) = match words.as_slice() {
            ["provision", sub, ..] | ["device-agent", sub, ..] => (words[0], Some(*sub)),
            ["broker", "check-config", ..] => ("broker", Some("check-config")),
            ["broker", "--config", ..] => ("broker", None),
            _ => continue,
        };
        let mut help = Command::new(workspace_bin(binary));
        help.args(sub).arg("--help");
        let text = run_ok(&mut help);
        for flag in words
            .iter()
            .take_while(|w| !w.starts_with('#'))
            .filter(|w| w.starts_with("--"))
        {
            let flag = flag.split('=').next().unwrap_or(flag);
            assert!(
                text.contains(flag),
                "README line {line:?}: `{binary} {}` has no {flag}",
                sub.unwrap_or("")
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} command lines found in the README");
}

#[test]
fn the_renewal_protocol_table_covers_every_error_code() {
    let readme = readme();
    for code in fleet_identity::renewal::ErrorCode::ALL {
        assert!(
            readme.contains(&format!("| `{}` |", code.as_str())),
            "README's renewal error codes lack `{}`",
            code.as_str()
        );
    }
    assert!(readme.contains("`expired_grace`") && readme.contains("`renewal_grace_days`"));
}
