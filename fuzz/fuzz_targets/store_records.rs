//! Records of the store's metadata database (a damaged or stolen disk is an input too).
#![no_main]

use cellswarm_common::records::{AuditEntry, Head, PeerRecord, decode_record};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_record::<Head>(data);
    let _ = decode_record::<AuditEntry>(data);
    let _ = decode_record::<PeerRecord>(data);
});
