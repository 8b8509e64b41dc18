//! Short-lived TURN credentials, in the scheme coturn's `use-auth-secret` checks (the "TURN REST
//! API" draft): the username is `<expiry>:<userId>`, the password the base64 HMAC-SHA1 of the
//! username keyed with a secret the TURN server shares. Nothing is stored: the TURN server checks
//! each credential from the secret and refuses it after its expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};

use crate::config::Config;
use crate::protocol::IceServer;

/// The username and password for `user`, valid until `now + ttl`.
pub fn credentials(secret: &str, user: &str, ttl: Duration, now: SystemTime) -> (String, String) {
    let expiry = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let username = format!("{expiry}:{user}");
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

/// The configured TURN servers with fresh credentials for `user`, when `turn_urls` and
/// `turn_secret` are set.
pub fn ice_server(config: &Config, user: &str) -> Option<IceServer> {
    let secret = config.turn_secret.as_deref()?;
    if config.turn_urls.is_empty() {
        return None;
    }
    let ttl = Duration::from_secs(config.turn_ttl_secs);
    let (username, credential) = credentials(secret, user, ttl, SystemTime::now());
    Some(IceServer {
        urls: config.turn_urls.clone(),
        username: Some(username),
        credential: Some(credential),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_follow_the_shared_secret_scheme() {
        // Computed independently: Python's hmac.new(b"north-shore-secret", b"1764806400:ann",
        // hashlib.sha1), base64.
        let now = UNIX_EPOCH + Duration::from_secs(1_764_720_000);
        let (username, password) = credentials(
            "north-shore-secret",
            "ann",
            Duration::from_secs(86_400),
            now,
        );
        assert_eq!(username, "1764806400:ann");
        assert_eq!(password, "iF3341liRY3L6qM0imtdoiHa6C4=");
    }

    #[test]
    fn without_a_secret_or_urls_nothing_is_handed_out() {
        let mut config = Config {
            turn_urls: vec!["turn:turn.example.com:3478".into()],
            ..Config::default()
        };
        assert_eq!(ice_server(&config, "ann"), None);
        config.turn_secret = Some("s".into());
        let server = ice_server(&config, "ann").expect("a TURN server");
        assert_eq!(server.urls, config.turn_urls);
        assert!(server.username.is_some_and(|u| u.ends_with(":ann")));
        config.turn_urls.clear();
        assert_eq!(ice_server(&config, "ann"), None);
    }
}
