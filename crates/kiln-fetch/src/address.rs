//! Which network addresses outbound requests may reach: internal ones
//! (loopback, private, link-local, CGNAT, unique-local…) are refused unless the
//! caller trusts the host, and a request connects to the address that was checked.

use std::net::{IpAddr, SocketAddr};

use crate::FetchError;

/// Whether an address is internal: loopback, private, link-local, CGNAT,
/// unspecified, broadcast, multicast or IPv6 unique-local.
pub fn is_internal(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Resolve `url`'s host to the one address a request may connect to: refused
/// when any of its addresses is internal, unless `allow_internal`.
pub async fn checked_address(
    url: &reqwest::Url,
    allow_internal: bool,
) -> Result<SocketAddr, FetchError> {
    let host = url
        .host_str()
        .ok_or_else(|| FetchError::BadUrl(format!("{url} has no host")))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| FetchError::BadUrl(format!("{url} has no port")))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| FetchError::Network(format!("cannot resolve {bare}: {e}")))?
        .collect();
    let first = *addresses
        .first()
        .ok_or_else(|| FetchError::Network(format!("{bare} has no address")))?;
    if !allow_internal && let Some(internal) = addresses.iter().find(|a| is_internal(a.ip())) {
        return Err(FetchError::InternalAddress {
            host: bare.to_string(),
            address: internal.ip(),
        });
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed() {
        let url = reqwest::Url::parse("http://127.0.0.1:9/hook").unwrap();
        let refused = checked_address(&url, false).await.unwrap_err();
        assert!(
            refused.to_string().contains("internal address"),
            "{refused}"
        );
        assert!(checked_address(&url, true).await.is_ok());
    }
}
