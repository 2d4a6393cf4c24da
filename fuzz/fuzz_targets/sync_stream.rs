//! The request-response codec's framing: length prefixes and limits, then the message.
#![no_main]

use cellswarm_common::wire::{decode_request_stream, decode_response_stream};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_request_stream(data);
    let _ = decode_response_stream(data, 1 << 20);
    let _ = decode_response_stream(data, 16);
});
