//! `device-agent check`: offline checks of the device's own files, then one connection attempt,
//! and a diagnosis in plain words with a distinct exit code.

use std::sync::Arc;
use std::time::Duration;

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::Agent;
use crate::diagnosis::Diagnosis;
use crate::session::{connect_once, mqtt_options};
use crate::trust::{device_identity, load_credentials, Credentials, FlooredClock};

/// Days before expiry from which the agent warns.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// One line of the report.
pub struct Finding {
    /// Whether this check passed.
    pub ok: bool,
    /// What was checked, and what was found.
    pub text: String,
}

/// Runs the offline checks; returns the findings and, if one failed, the diagnosis.
pub fn offline(agent: &Agent, clock: &FlooredClock) -> (Vec<Finding>, Option<Diagnosis>) {
    let mut findings = Vec::new();
    let mut note = |ok, text: String| findings.push(Finding { ok, text });
    let (identity, cert) = match device_identity(&agent.config.cert) {
        Ok(found) => found,
        Err(e) => {
            let diagnosis = Diagnosis::LocalProblem(e.to_string());
            note(false, e.to_string());
            return (findings, Some(diagnosis));
        }
    };
    note(
        true,
        format!("device id {} (from {})", identity.id, agent.config.cert.display()),
    );
    if clock.is_behind() {
        note(
            true,
            "the system clock is earlier than this agent's build time: certificates are checked against the build time"
                .into(),
        );
    }
    let Ok((_, parsed)) = X509Certificate::from_der(&cert) else {
        return (
            findings,
            Some(Diagnosis::LocalProblem("the device certificate does not parse".into())),
        );
    };
    let now = clock.seconds() as i64;
    let (not_before, not_after) = (
        parsed.validity().not_before.timestamp(),
        parsed.validity().not_after.timestamp(),
    );
    if now < not_before {
        note(
            false,
            "the device certificate is not valid yet (check the clock)".into(),
        );
        return (
            findings,
            Some(Diagnosis::LocalProblem("device certificate not yet valid".into())),
        );
    }
    let days_left = (not_after - now) / 86_400;
    if now > not_after {
        // Still try the broker: its verdict (and the TLS alert it sends) is the one that counts.
        note(
            false,
            "the device certificate has EXPIRED by this device's clock: re-provision this device".into(),
        );
    } else {
        note(
            days_left > EXPIRY_WARNING_DAYS,
            format!("device certificate valid for {days_left} more days"),
        );
    }
    match key_matches(agent, &cert) {
        Ok(()) => note(
            true,
            format!("private key {} matches the certificate", agent.config.key.display()),
        ),
        Err(problem) => {
            note(false, problem.clone());
            return (findings, Some(Diagnosis::LocalProblem(problem)));
        }
    }
    match fleet_identity::pem::load_certs(&agent.config.ca) {
        Ok(cas) => note(
            true,
            format!(
                "{} broker CA certificate(s) in {}",
                cas.len(),
                agent.config.ca.display()
            ),
        ),
        Err(e) => {
            note(false, e.to_string());
            return (findings, Some(Diagnosis::LocalProblem(e.to_string())));
        }
    }
    (findings, None)
}

fn key_matches(agent: &Agent, cert: &[u8]) -> Result<(), String> {
    crate::identity_files::key_matches(
        &agent.config.key,
        &agent.config.cert,
        &rustls::pki_types::CertificateDer::from(cert),
    )
}

/// Offline checks, then one connection attempt. Prints the report; returns the diagnosis.
pub async fn run(agent: &Agent) -> Diagnosis {
    let clock = Arc::new(FlooredClock::system());
    let (findings, failed) = offline(agent, &clock);
    for finding in &findings {
        println!("{} {}", if finding.ok { "ok  " } else { "FAIL" }, finding.text);
    }
    if let Some(diagnosis) = failed {
        return diagnosis;
    }
    let Credentials { identity, tls, .. } = match load_credentials(agent, clock) {
        Ok(credentials) => credentials,
        Err(e) => return Diagnosis::LocalProblem(e.to_string()),
    };
    let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt_options(agent, &identity, tls), 4);
    let diagnosis = connect_once(&mut eventloop, Duration::from_secs(10)).await;
    if diagnosis == Diagnosis::Ok {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    diagnosis
}
