//! The base URL of a request, which every absolute link the gateway serves starts with: the configured `server.base_url`, else what the client used (`Host`, or a trusted proxy's `Forwarded` / `X-Forwarded-*`), else the address the connection reached.
//!
//! Handlers take it as [`RequestBase`] (an extractor) or as [`Caller::base`](super::caller::Caller);
//! nothing else builds a link from the listen address.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use super::state::AppState;
use crate::server::{LocalAddr, PeerAddr};

/// Where a request's links point.
#[derive(Clone, Debug)]
pub struct RequestBase {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub url: String,
    /// Whether the gateway can vouch that `url` names itself: configured, or a `Host` that is the
    /// address and port the connection reached. Only such a base makes a token audience.
    pub own: bool,
}

impl RequestBase {
    /// The base of the request whose head is `parts`.
    pub fn of(parts: &Parts, state: &AppState) -> RequestBase {
        if state.loaded.config.server.base_url.is_some() {
            return RequestBase { url: state.base_url.clone(), own: true };
        }
        let scheme = if state.loaded.config.server.tls.is_some() { "https" } else { "http" };
        let local = parts.extensions.get::<LocalAddr>().map(|l| l.0);
        let host = parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| parts.uri.authority().map(|a| a.as_str())).and_then(authority);
        let peer = parts.extensions.get::<ConnectInfo<PeerAddr>>().map(|c| c.0.0.ip());
        if let Some(peer) = peer
            && state.loaded.trusted_proxies.iter().any(|proxy| proxy.contains(peer))
            && let Some((proto, forwarded_host, prefix)) = forwarded(&parts.headers)
            && let Some(host) = forwarded_host.or_else(|| host.clone()).or_else(|| local.map(|l| l.to_string()))
        {
            return RequestBase { url: format!("{}://{host}{prefix}", proto.unwrap_or(scheme)), own: false };
        }
        match (host, local) {
            (Some(host), local) => {
                let own = local.is_some_and(|local| reaches(&host, scheme, local));
                RequestBase { url: format!("{scheme}://{host}"), own }
            }
            (None, Some(local)) => RequestBase { url: format!("{scheme}://{local}"), own: true },
            (None, None) => RequestBase { url: state.base_url.clone(), own: true },
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}{}", self.url, crate::auth::TOKEN_PATH)
    }
}

impl FromRequestParts<AppState> for RequestBase {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        Ok(RequestBase::of(parts, state))
    }
}

/// A `Host` value as an authority fit for a URL: `host[:port]` with a DNS name, an IPv4 address
/// or a bracketed IPv6 address, lower-cased; `None` for anything else (userinfo, paths, spaces).
fn authority(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() || text.len() > 261 {
        return None;
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (&text[..inside.len() + 2], port)
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if !host.starts_with('[') {
        let labels_ok = host.split('.').all(|label| !label.is_empty() && label.len() <= 63 && !label.starts_with('-') && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !labels_ok || host.len() > 253 {
            return None;
        }
    }
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
    {
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// Whether an authority names the address and port the connection reached (or `localhost` on a
/// loopback connection): only then is a `Host` known to name this gateway rather than being whatever the client wrote.
fn reaches(authority: &str, scheme: &str, local: SocketAddr) -> bool {
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse::<u16>().ok()),
        _ => (authority, Some(if scheme == "https" { 443 } else { 80 })),
    };
    let local_ip = local.ip().to_canonical();
    let same_host = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical() == local_ip,
        Err(_) => host == "localhost" && local_ip.is_loopback(),
    };
    same_host && port == Some(local.port())
}

/// What a trusted proxy says the client used: protocol, host (each only when valid) and path
/// prefix; `None` when it says nothing. `Forwarded` (RFC 7239) wins over `X-Forwarded-*`; of
/// several hops, the first (the client's) counts.
fn forwarded(headers: &HeaderMap) -> Option<(Option<&'static str>, Option<String>, String)> {
    let first = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or_default().trim().to_string()).filter(|v| !v.is_empty());
    let (proto, host) = match first("forwarded") {
        Some(element) => {
            let pairs: Vec<(String, String)> =
                element.split(';').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().trim_matches('"').to_string())).collect();
            let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            (get("proto"), get("host"))
        }
        None => (first("x-forwarded-proto"), first("x-forwarded-host")),
    };
    let prefix = first("x-forwarded-prefix");
    if proto.is_none() && host.is_none() && prefix.is_none() {
        return None;
    }
    let proto = match proto.map(|p| p.to_ascii_lowercase()).as_deref() {
        Some("https") => Some("https"),
        Some("http") => Some("http"),
        _ => None,
    };
    let prefix = prefix.filter(|p| p.starts_with('/') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b)) && !p.split('/').any(|s| s == "." || s == "..")).unwrap_or_default();
    Some((proto, host.as_deref().and_then(authority), prefix.trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_authorities_are_taken_from_host() {
        for (text, expected) in [("localhost:8080", Some("localhost:8080")), ("GW.Example.org", Some("gw.example.org")), ("[::1]:9", Some("[::1]:9")), ("10.0.0.1", Some("10.0.0.1"))] {
            assert_eq!(authority(text).as_deref(), expected, "{text}");
        }
        for bad in ["", "user@host", "host/path", "host:", "host:99999", "host:80:80", "[::1", "[zz]:1", "a b", "-x.org", "x..org", "host:8o", "evil.org#"] {
            assert_eq!(authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_host_is_ours_only_when_it_is_the_address_the_connection_reached() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(reaches("127.0.0.1:8080", "http", local));
        assert!(reaches("localhost:8080", "http", local));
        assert!(!reaches("localhost:9090", "http", local));
        assert!(!reaches("evil.example:8080", "http", local));
        assert!(!reaches("10.0.0.1:8080", "http", local));
        assert!(reaches("[::1]:443", "https", "[::1]:443".parse().unwrap()));
        assert!(reaches("192.0.2.7", "http", "[::ffff:192.0.2.7]:80".parse().unwrap()));
        assert!(!reaches("localhost:8080", "http", "192.0.2.7:8080".parse().unwrap()));
    }

    #[test]
    fn forwarded_headers_give_the_first_hop_and_drop_what_is_not_valid() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.append(*k, v.parse().unwrap());
            }
            map
        };
        assert_eq!(forwarded(&headers(&[])), None);
        assert_eq!(
            forwarded(&headers(&[("forwarded", "for=192.0.2.1;proto=https;host=\"fhir.example:8443\", for=10.0.0.1;host=inner"), ("x-forwarded-host", "ignored.example")])),
            Some((Some("https"), Some("fhir.example:8443".to_string()), String::new()))
        );
        assert_eq!(
            forwarded(&headers(&[("x-forwarded-proto", "https"), ("x-forwarded-host", "a.example, b.example"), ("x-forwarded-prefix", "/fhir/r4/")])),
            Some((Some("https"), Some("a.example".to_string()), "/fhir/r4".to_string()))
        );
        assert_eq!(forwarded(&headers(&[("x-forwarded-proto", "gopher"), ("x-forwarded-host", "a@b"), ("x-forwarded-prefix", "/../x")])), Some((None, None, String::new())));
    }
}
