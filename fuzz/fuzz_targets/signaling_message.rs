//! A signaling frame as a stranger may send it: decoded, and when it decodes, named and encoded
//! back without panicking; a refusal always says which mistake it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::protocol::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientMessage::decode(text) {
        Ok(message) => {
            let _ = message.type_name();
        }
        Err(err) => {
            assert!(!err.message.is_empty(), "a refusal must say why");
        }
    }
});
