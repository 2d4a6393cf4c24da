//! Control messages (announcements, secure-aggregation key shares and restarts,
//! requests, response headers, delta headers) and frames.
#![no_main]

use cellswarm_common::wire::{
    Announcement, DeltaHeader, MaskMessage, Request, ResponseHeader, decode_control, decode_frame,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_control::<Announcement>(data);
    let _ = decode_control::<MaskMessage>(data);
    let _ = decode_control::<Request>(data);
    let _ = decode_control::<ResponseHeader>(data);
    let _ = decode_frame::<DeltaHeader>(data);
    let _ = decode_frame::<ResponseHeader>(data);
});
