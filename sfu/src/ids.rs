//! Typed identifiers shared by the media plane and the signaling service.

use std::fmt;
use std::sync::Arc;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// A fresh random id, prefixed so that ids of different kinds never look alike.
            pub fn random() -> Self {
                Self(format!(concat!($prefix, "{:012x}"), rand::random::<u64>() >> 16).into())
            }

            /// The id as text, exactly as it appears on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.into())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// One identity in a room (`participantId` on the wire).
    ParticipantId,
    "p-"
);
string_id!(
    /// One source a participant sends: microphone, camera or screen (`publicationId` on the wire).
    PublicationId,
    "pub-"
);

/// What a publication carries, as told by the publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Audio from a microphone.
    Microphone,
    /// Video from a camera.
    Camera,
    /// A screen or window capture.
    Screen,
}

impl Source {
    /// The wire name: `microphone`, `camera` or `screen`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Microphone => "microphone",
            Source::Camera => "camera",
            Source::Screen => "screen",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "microphone" => Some(Source::Microphone),
            "camera" => Some(Source::Camera),
            "screen" => Some(Source::Screen),
            _ => None,
        }
    }
}

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediaKind {
    /// An audio publication.
    Audio,
    /// A video publication.
    Video,
}

impl MediaKind {
    /// The wire name: `audio` or `video`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}
