//! Tokens: `POST /auth/token` mints them, the WebSocket upgrade checks them.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token grants: one user in one room until `exp`.
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
}

/// Signs and checks tokens with one HS256 secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_secs: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {0}")]
pub struct TokenError(#[from] jsonwebtoken::errors::Error);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenAuthority {
    /// An authority with `secret`, or a random one.
    pub fn new(secret: Option<&str>, ttl_secs: u64) -> Self {
        let secret = secret.map(|s| s.as_bytes().to_vec()).unwrap_or_else(|| {
            let random: [u8; 32] = rand::random();
            random.to_vec()
        });
        Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            ttl_secs,
        }
    }

    /// A token for `user` in `room`.
    pub fn mint(&self, user: &str, room: &str) -> Result<String, TokenError> {
        let iat = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            room: room.to_owned(),
            iat,
            exp: iat + self.ttl_secs,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// The claims of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)?.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_secret_and_before_expiry() {
        let authority = TokenAuthority::new(Some("s1"), 60);
        let token = authority.mint("ann", "Standup").expect("mint");
        let claims = authority.verify(&token).expect("valid");
        assert_eq!(
            (claims.sub.as_str(), claims.room.as_str()),
            ("ann", "Standup")
        );
        assert!(TokenAuthority::new(Some("s2"), 60).verify(&token).is_err());
        assert!(authority.verify("not-a-token").is_err());

        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "ann".into(),
                room: "r".into(),
                iat: 1,
                exp: 2,
            },
            &EncodingKey::from_secret(b"s1"),
        )
        .expect("encode");
        assert!(authority.verify(&expired).is_err());
    }
}
