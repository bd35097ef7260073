//! The HTTP agent's resolver, kept apart from the client as it answers to ureq's
//! resolver interface, not to the cache's requests.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

/// How long [`CacheResolver`] keeps what a host name resolved to.
const RESOLVED_FOR: Duration = Duration::from_secs(10);

/// Resolves the cache's host for the HTTP agent. ureq resolves before it looks for a
/// pooled connection, and its resolver starts a thread for each lookup with a
/// deadline (every `HEAD`): a thread per request, for an address that never
/// changes. Here an IP address is taken as it is, and a host name's addresses are
/// kept for [`RESOLVED_FOR`].
#[derive(Debug, Default)]
pub(super) struct CacheResolver {
    system: ureq::unversioned::resolver::DefaultResolver,
    /// Host and port -> addresses, and when they were looked up.
    known: Mutex<std::collections::HashMap<String, (ResolvedAddrs, std::time::Instant)>>,
    /// Lookups handed to the system resolver.
    lookups: std::sync::atomic::AtomicUsize,
}

type ResolvedAddrs = ureq::unversioned::resolver::ResolvedSocketAddrs;

impl ureq::unversioned::resolver::Resolver for CacheResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedAddrs, ureq::Error> {
        // "host:port", the port from the scheme where the URI has none, as ureq's
        // own resolver has it (for a proxy, socks5 is 1080).
        let Some(key) = uri
            .scheme()
            .zip(uri.authority())
            .and_then(|(scheme, authority)| {
                ureq::unversioned::resolver::DefaultResolver::host_and_port(scheme, authority)
            })
        else {
            return self.system.resolve(uri, config, timeout);
        };
        if let Ok(addr) = key.parse::<std::net::SocketAddr>() {
            let mut addrs = self.empty();
            addrs.push(addr);
            return Ok(addrs);
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((addrs, at)) = known.get(&key) {
            if at.elapsed() < RESOLVED_FOR {
                return Ok(addrs.clone());
            }
        }
        drop(known);
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let addrs = self.system.resolve(uri, config, timeout)?;
        known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.insert(key, (addrs.clone(), std::time::Instant::now()));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_takes_addresses_as_they_are_and_keeps_host_names_a_while() {
        use ureq::unversioned::resolver::Resolver;
        let resolver = CacheResolver::default();
        let config = ureq::config::Config::default();
        // A deadline: ureq's own resolver starts a thread for each such lookup.
        let timeout = ureq::unversioned::transport::NextTimeout {
            after: ureq::unversioned::transport::time::Duration::from_secs(10),
            ..Default::default()
        };
        let resolve = |uri: &str| {
            let uri: ureq::http::Uri = uri.parse().unwrap();
            resolver.resolve(&uri, &config, timeout).unwrap().to_vec()
        };
        assert_eq!(
            resolve("http://127.0.0.1:8080/cache/t/x.tar"),
            vec!["127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]/cache"),
            vec!["[::1]:443".parse::<std::net::SocketAddr>().unwrap()]
        );
        // A proxy's port, where its URI has none, is its scheme's.
        assert_eq!(
            resolve("socks5://10.1.2.3"),
            vec!["10.1.2.3:1080".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(resolver.lookups.load(Ordering::Relaxed), 0);
        let first = resolve("http://localhost:8080/a");
        assert!(first.iter().all(|a| a.port() == 8080), "{first:?}");
        assert_eq!(resolve("http://localhost:8080/b"), first);
        // Regression: one lookup, and one thread, per request.
        assert_eq!(resolver.lookups.load(Ordering::Relaxed), 1);
    }
}
