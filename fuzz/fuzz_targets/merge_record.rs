//! Merge records: the control encoding, and inside an envelope as peers send them.
#![no_main]

use cellswarm_common::envelope::{AnySigner, PayloadKind, UnverifiedEnvelope};
use cellswarm_common::wire::{MergeRecord, decode_control};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_control::<MergeRecord>(data);
    if let Ok(v) = UnverifiedEnvelope::parse(data.to_vec(), 1 << 20)
        .and_then(|e| e.verify(PayloadKind::MergeRecord, &AnySigner))
    {
        let _ = decode_control::<MergeRecord>(v.payload());
    }
});
