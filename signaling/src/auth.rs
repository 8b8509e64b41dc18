//! Tokens and API keys.
//!
//! A token is an HS256 JWT naming a user, a room and what it grants, signed with the secret of
//! one API key (its `kid` header names the key). `POST /auth/token` mints them for a caller that
//! presents an API key (HTTP Basic, `key:secret`), or for anyone in the development posture (no
//! keys, loopback only: see [`crate::config::Posture`]); a backend may also sign them itself.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Seconds a token's `nbf` and `iat` may lie ahead of this clock (a backend's clock runs a little
/// fast); `exp` has none.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// The shortest API secret accepted: an HS256 key shorter than its 256-bit output is guessable
/// offline from any token.
pub const MIN_SECRET_BYTES: usize = 32;
/// The key name of the development posture's random secret.
pub const DEVELOPMENT_KEY: &str = "development";

/// What a token allows in its room. Joining is always allowed; publishing and subscribing are
/// unless the token says otherwise (a viewer's token: `{"publish": false}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Grants {
    /// Send media (camera, microphone, screen). Default true.
    pub publish: bool,
    /// Receive the others' media. Default true.
    pub subscribe: bool,
    /// Administer the token's room (`/api/rooms/{room}`): see docs/operations.md.
    pub room_admin: bool,
    /// List every room (`GET /api/rooms`).
    pub room_list: bool,
    /// Enter the lobby: be seen online and call others (docs/protocol.md, section 12).
    pub lobby: bool,
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            publish: true,
            subscribe: true,
            room_admin: false,
            room_list: false,
            lobby: false,
        }
    }
}

impl Grants {
    /// Only the SFU can hold a participant to these grants: in a mesh, media flows between
    /// browsers, out of the server's reach.
    pub fn needs_sfu(&self) -> bool {
        !self.publish || !self.subscribe
    }
}

/// What a token carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The userId.
    pub sub: String,
    /// The room, as requested (rooms compare case-insensitively).
    pub room: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// What it allows in the room.
    #[serde(default, skip_serializing_if = "is_default")]
    pub grants: Grants,
}

fn is_default(grants: &Grants) -> bool {
    *grants == Grants::default()
}

struct ApiKey {
    secret: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// Signs and checks tokens with the configured API keys (or one random key).
#[derive(Clone)]
pub struct TokenAuthority {
    keys: std::sync::Arc<HashMap<String, ApiKey>>,
    /// The key that signs tokens minted here.
    signing_key: String,
    ttl_secs: u64,
}

/// Why a token or an API key was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("invalid token: signed with an unknown key")]
    UnknownKey,
    #[error("invalid token: issued in the future")]
    IssuedInFuture,
    #[error("no API key named {0:?}")]
    NoSuchKey(String),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenAuthority {
    /// An authority with `api_keys` (name to secret); with none, one random key (development).
    /// Tokens it mints are signed with the first key by name.
    pub fn new(api_keys: &BTreeMap<String, String>, ttl_secs: u64) -> Self {
        let mut keys = HashMap::new();
        let mut signing_key = None;
        for (name, secret) in api_keys {
            signing_key.get_or_insert_with(|| name.clone());
            keys.insert(name.clone(), ApiKey::new(secret.as_bytes().to_vec()));
        }
        let signing_key = signing_key.unwrap_or_else(|| {
            let random: [u8; 32] = rand::random();
            keys.insert(DEVELOPMENT_KEY.to_owned(), ApiKey::new(random.to_vec()));
            DEVELOPMENT_KEY.to_owned()
        });
        Self {
            keys: std::sync::Arc::new(keys),
            signing_key,
            ttl_secs,
        }
    }

    /// A token for `user` in `room`, signed with the first key.
    pub fn mint(&self, user: &str, room: &str, grants: Grants) -> Result<String, TokenError> {
        self.mint_with(&self.signing_key, user, room, grants, self.ttl_secs)
    }

    /// A token signed with the key named `key`, valid for `ttl_secs`.
    pub fn mint_with(
        &self,
        key: &str,
        user: &str,
        room: &str,
        grants: Grants,
        ttl_secs: u64,
    ) -> Result<String, TokenError> {
        let api_key = self
            .keys
            .get(key)
            .ok_or_else(|| TokenError::NoSuchKey(key.to_owned()))?;
        let iat = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            room: room.to_owned(),
            iat,
            exp: iat + ttl_secs,
            nbf: None,
            grants,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, &api_key.encoding)?)
    }

    /// The claims of a valid token: signed by a known key, unexpired, already valid.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token)?;
        // A token without `kid` is taken as signed by the only key, when there is one.
        let key = match header.kid.as_deref() {
            Some(kid) => self.keys.get(kid),
            None if self.keys.len() == 1 => self.keys.values().next(),
            None => None,
        }
        .ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)?.claims;
        let now = now_secs();
        if claims.iat > now + CLOCK_SKEW_SECS {
            return Err(TokenError::IssuedInFuture);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + CLOCK_SKEW_SECS) {
            return Err(jsonwebtoken::errors::Error::from(
                jsonwebtoken::errors::ErrorKind::ImmatureSignature,
            )
            .into());
        }
        Ok(claims)
    }

    /// Whether `key:secret` names a configured API key (the development key never matches).
    /// The secret is compared in constant time.
    pub fn check_api_key(&self, key: &str, secret: &str) -> bool {
        key != DEVELOPMENT_KEY
            && self
                .keys
                .get(key)
                .is_some_and(|api_key| bool::from(api_key.secret.ct_eq(secret.as_bytes())))
    }
}

impl ApiKey {
    fn new(secret: Vec<u8>) -> Self {
        Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            secret,
        }
    }
}

/// What an `Authorization` header presents. Schemes compare case-insensitively (RFC 9110).
#[derive(Debug, PartialEq, Eq)]
pub enum Presented {
    /// `Basic base64(key:secret)`: an API key.
    ApiKey { key: String, secret: String },
    /// `Bearer <token>`.
    Bearer(String),
}

impl Presented {
    /// The credentials in an `Authorization` header value, if it holds any.
    pub fn parse(value: &str) -> Option<Self> {
        let (scheme, rest) = value.trim().split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(Self::Bearer(rest.to_owned()));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (key, secret) = decoded.split_once(':')?;
        Some(Self::ApiKey {
            key: key.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// Compares two secrets in constant time (for their length).
pub fn same_secret(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_1: &str = "s1-0123456789abcdef0123456789abcdef";
    const SECRET_2: &str = "s2-0123456789abcdef0123456789abcdef";

    fn authority(secret: &str) -> TokenAuthority {
        TokenAuthority::new(&BTreeMap::from([("k1".into(), secret.into())]), 60)
    }

    fn signed(claims: &Claims, kid: Option<&str>, secret: &str) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn claims(iat: u64, exp: u64) -> Claims {
        Claims {
            sub: "ann".into(),
            room: "r".into(),
            iat,
            exp,
            nbf: None,
            grants: Grants::default(),
        }
    }

    #[test]
    fn tokens_verify_only_with_their_secret_and_before_expiry() {
        let first = authority(SECRET_1);
        let token = first
            .mint("ann", "Standup", Grants::default())
            .expect("mint");
        let verified = first.verify(&token).expect("valid");
        assert_eq!(
            (verified.sub.as_str(), verified.room.as_str()),
            ("ann", "Standup")
        );
        assert!(authority(SECRET_2).verify(&token).is_err());
        assert!(first.verify("not-a-token").is_err());
        let expired = signed(&claims(1, 2), Some("k1"), SECRET_1);
        assert!(first.verify(&expired).is_err());
    }

    #[test]
    fn tokens_from_the_future_are_refused() {
        let authority = authority(SECRET_1);
        let now = now_secs();
        let issued_later = signed(&claims(now + 3600, now + 7200), Some("k1"), SECRET_1);
        assert!(matches!(
            authority.verify(&issued_later),
            Err(TokenError::IssuedInFuture)
        ));
        let mut not_yet = claims(now, now + 7200);
        not_yet.nbf = Some(now + 3600);
        assert!(
            authority
                .verify(&signed(&not_yet, Some("k1"), SECRET_1))
                .is_err()
        );
        // A backend's clock a few seconds fast is fine.
        let mut skewed = claims(now + 5, now + 600);
        skewed.nbf = Some(now + 5);
        assert!(
            authority
                .verify(&signed(&skewed, Some("k1"), SECRET_1))
                .is_ok()
        );
    }

    #[test]
    fn the_key_id_picks_the_secret_and_grants_survive() {
        let authority = TokenAuthority::new(
            &BTreeMap::from([
                ("k1".into(), SECRET_1.into()),
                ("k2".into(), SECRET_2.into()),
            ]),
            60,
        );
        let grants = Grants {
            publish: false,
            room_admin: true,
            ..Grants::default()
        };
        let token = authority
            .mint_with("k2", "ann", "r", grants, 60)
            .expect("mint");
        assert_eq!(authority.verify(&token).expect("valid").grants, grants);
        let now = now_secs();
        let wrong_key = signed(&claims(now, now + 60), Some("k1"), SECRET_2);
        assert!(authority.verify(&wrong_key).is_err());
        let unknown = signed(&claims(now, now + 60), Some("k3"), SECRET_1);
        assert!(matches!(
            authority.verify(&unknown),
            Err(TokenError::UnknownKey)
        ));
        // With two keys, a token must say which signed it.
        let anonymous = signed(&claims(now, now + 60), None, SECRET_1);
        assert!(authority.verify(&anonymous).is_err());
    }

    #[test]
    fn api_keys_are_checked_and_the_development_key_never_matches() {
        let authority = authority(SECRET_1);
        assert!(authority.check_api_key("k1", SECRET_1));
        assert!(!authority.check_api_key("k1", SECRET_2));
        assert!(!authority.check_api_key("k2", SECRET_1));
        let development = TokenAuthority::new(&BTreeMap::new(), 60);
        assert!(!development.check_api_key(DEVELOPMENT_KEY, ""));
    }

    #[test]
    fn authorization_schemes_are_case_insensitive() {
        let basic = base64::engine::general_purpose::STANDARD.encode("k1:se:cret");
        assert_eq!(
            Presented::parse(&format!("bAsIc {basic}")),
            Some(Presented::ApiKey {
                key: "k1".into(),
                secret: "se:cret".into()
            })
        );
        assert_eq!(
            Presented::parse("bearer abc"),
            Some(Presented::Bearer("abc".into()))
        );
        assert_eq!(Presented::parse("Digest abc"), None);
        assert_eq!(Presented::parse("Basic %%%"), None);
    }
}
