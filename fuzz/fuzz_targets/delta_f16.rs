//! The f16 delta body decoder, behind a valid header and tensor table.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cellswarm_fuzz::delta_body(1, data));
