//! Signed envelopes: parsing, then signature verification against any signer.
#![no_main]

use cellswarm_common::envelope::{AnySigner, PayloadKind, UnverifiedEnvelope};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(env) = UnverifiedEnvelope::parse(data.to_vec(), 1 << 20) {
        let kind = env.kind();
        let _ = env.claimed_signer();
        let _ = env.verify(kind, &AnySigner);
    }
    let _ = UnverifiedEnvelope::parse(data.to_vec(), 64)
        .and_then(|e| e.verify(PayloadKind::Delta, &AnySigner));
});
