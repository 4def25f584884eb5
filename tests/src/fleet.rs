//! A throwaway fleet PKI, made with the provisioning library (the same code paths as `provision`).

use std::fs;
use std::path::{Path, PathBuf};

use fleet_identity::{DeviceId, Identity, Role};
use provisioning::batch::{issue_devices, IssueOptions};
use provisioning::broker_bundle::{issue_broker, BrokerRequest};
use provisioning::issue::issue_named;
use provisioning::key_type::KeyType;
use provisioning::output::Overwrite;
use provisioning::pki::{InitOptions, Pki};
use provisioning::registry::RevokeTarget;
use provisioning::revocation::Reason;

/// A PKI, a broker bundle for `localhost`/`127.0.0.1`, and helpers to issue identities.
pub struct TestFleet {
    dir: tempfile::TempDir,
}

impl Default for TestFleet {
    fn default() -> Self {
        Self::new()
    }
}

impl TestFleet {
    /// A new fleet named `test` with its broker bundle.
    pub fn new() -> Self {
        let fleet = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        let options = InitOptions {
            fleet: "test".into(),
            key_type: KeyType::EcdsaP256,
            ca_validity_days: 365,
        };
        Pki::init(&fleet.pki_dir(), &options).expect("init");
        let request = BrokerRequest {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().expect("an address")],
            validity_days: 30,
            overwrite: Overwrite::Refuse,
        };
        issue_broker(&mut fleet.pki(), &fleet.broker_dir(), &request).expect("broker bundle");
        fleet
    }

    /// The temporary directory everything lives in.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The PKI directory.
    pub fn pki_dir(&self) -> PathBuf {
        self.path().join("pki")
    }

    /// The opened PKI.
    pub fn pki(&self) -> Pki {
        Pki::open(&self.pki_dir()).expect("open the PKI")
    }

    /// The broker bundle directory (broker.crt, broker.key, device-ca.crt, broker.toml).
    pub fn broker_dir(&self) -> PathBuf {
        self.path().join("broker")
    }

    /// The `broker.toml` that `provision broker` wrote.
    pub fn broker_config(&self) -> PathBuf {
        self.broker_dir().join("broker.toml")
    }

    /// The PKI's CRL file.
    pub fn crl(&self) -> PathBuf {
        self.pki_dir().join("crl.pem")
    }

    /// Issues device `id`; returns its bundle directory.
    pub fn device(&self, id: &str) -> PathBuf {
        self.devices(&[id]).remove(0)
    }

    /// Issues several devices at once; returns their bundle directories.
    pub fn devices(&self, ids: &[&str]) -> Vec<PathBuf> {
        let ids: Vec<DeviceId> = ids.iter().map(|id| id.parse().expect("a valid id")).collect();
        let options = IssueOptions {
            broker_url: "mqtts://localhost:8883".parse().expect("a URL"),
            validity: provisioning::validity::Validity::days(30),
            key_type: KeyType::EcdsaP256,
            jobs: 2,
            overwrite: Overwrite::Refuse,
            progress: false,
        };
        let out = self.path().join("devices");
        issue_devices(&mut self.pki(), &ids, &out, &options).expect("issue devices");
        ids.iter().map(|id| out.join(id.as_str())).collect()
    }

    /// Issues service `name`; returns its bundle directory.
    pub fn service(&self, name: &str) -> PathBuf {
        let out = self.path().join("services");
        let id: DeviceId = name.parse().expect("a valid name");
        issue_named(
            &mut self.pki(),
            Role::Service,
            &id,
            &out,
            provisioning::validity::Validity::days(30),
            Overwrite::Refuse,
        )
        .expect("issue service");
        out.join(name)
    }

    /// Issues the certificate of gateway `name` (its bridge's client identity, `urn:gateway:`);
    /// returns its bundle directory (gateway.crt, gateway.key).
    pub fn gateway(&self, name: &str) -> PathBuf {
        let out = self.path().join("gateways");
        let id: DeviceId = name.parse().expect("a valid name");
        issue_named(
            &mut self.pki(),
            Role::Gateway,
            &id,
            &out,
            provisioning::validity::Validity::days(30),
            Overwrite::Refuse,
        )
        .expect("issue gateway");
        out.join(name)
    }

    /// A broker.toml for gateway `name`, beside the broker bundle: the bundle's own settings, a
    /// store of its own (`store-<name>`), and a `[bridge]` with the gateway's certificate (issued
    /// here) and the lines `bridge` (upstreams, CA, topics, bounds).
    pub fn gateway_config(&self, name: &str, bridge: &str) -> PathBuf {
        let bundle = self.gateway(name);
        let base = fs::read_to_string(self.broker_config()).expect("broker.toml");
        let own_store = base.replace("dir = \"store\"", &format!("dir = \"store-{name}\""));
        assert_ne!(own_store, base, "broker.toml names its store as `dir = \"store\"`");
        let text = format!(
            "{own_store}\n[bridge]\nname = \"{name}\"\ncert = \"{}\"\nkey = \"{}\"\n{bridge}\n",
            bundle.join("gateway.crt").display(),
            bundle.join("gateway.key").display(),
        );
        let path = self.broker_dir().join(format!("broker-{name}.toml"));
        fs::write(&path, text).expect("write the gateway's broker.toml");
        path
    }

    /// Revokes every certificate of `id` and rewrites the CRL, as `provision revoke` does.
    pub fn revoke(&self, id: &str) {
        let target = RevokeTarget::Id {
            id: id.into(),
            kind: None,
        };
        self.pki()
            .revoke_and_publish(&target, Reason::KeyCompromise, 30)
            .expect("revoke");
    }

    /// Signs a client certificate with the device CA after `adjust` changes its profile; writes
    /// a device-style bundle (device.crt, device.key, broker-ca.crt) under `name`.
    pub fn custom_device(&self, name: &str, adjust: impl FnOnce(&mut rcgen::CertificateParams)) -> PathBuf {
        let pki = self.pki();
        let identity = Identity {
            role: Role::Device,
            id: name.parse().expect("a valid id"),
        };
        let mut params =
            provisioning::profile::client(&identity, &pki.fleet, provisioning::validity::Validity::days(30))
                .expect("a profile");
        adjust(&mut params);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &pki.device_ca.issuer).expect("signed");
        self.write_bundle(name, &cert.pem(), &key.serialize_pem())
    }

    /// Writes a device-style bundle from PEM texts.
    pub fn write_bundle(&self, name: &str, cert_pem: &str, key_pem: &str) -> PathBuf {
        let dir = self.path().join("custom").join(name);
        fs::create_dir_all(&dir).expect("bundle dir");
        fs::write(dir.join("device.crt"), cert_pem).expect("write cert");
        fs::write(dir.join("device.key"), key_pem).expect("write key");
        fs::copy(self.pki_dir().join("broker-ca.crt"), dir.join("broker-ca.crt")).expect("copy CA");
        dir
    }
}
