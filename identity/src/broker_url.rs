//! The broker address a device is given: `mqtts://HOST:PORT`.

use std::fmt;
use std::str::FromStr;

/// Default MQTT-over-TLS port.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// A parsed `mqtts://HOST[:PORT]` URL. Plain `mqtt://` is refused: devices only speak TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port (8883 if the URL names none).
    pub port: u16,
}

/// Why a broker URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker URL {url:?}: {reason} (expected mqtts://HOST:PORT)")]
pub struct BrokerUrlError {
    url: String,
    reason: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let fail = |reason| BrokerUrlError {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| fail("the scheme must be mqtts://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| fail("unclosed '[' in an IPv6 host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(fail("the host is empty or contains a path, query or user part"));
        }
        let port = match port {
            None => DEFAULT_MQTTS_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail("the port is not a number from 1 to 65535"))?,
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtts://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtts://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_ipv6() {
        let url: BrokerUrl = "mqtts://gw.local:18883".parse().unwrap();
        assert_eq!((url.host.as_str(), url.port), ("gw.local", 18883));
        assert_eq!("mqtts://gw".parse::<BrokerUrl>().unwrap().port, 8883);
        let v6: BrokerUrl = "mqtts://[::1]:9".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9));
        assert_eq!(v6.to_string(), "mqtts://[::1]:9");
    }

    #[test]
    fn refuses_plain_mqtt_and_bad_ports() {
        assert!("mqtt://gw:1883"
            .parse::<BrokerUrl>()
            .unwrap_err()
            .to_string()
            .contains("mqtts://"));
        assert!("mqtts://gw:0".parse::<BrokerUrl>().is_err());
        assert!("mqtts://gw:99999".parse::<BrokerUrl>().is_err());
        assert!("mqtts://:8883".parse::<BrokerUrl>().is_err());
    }
}
