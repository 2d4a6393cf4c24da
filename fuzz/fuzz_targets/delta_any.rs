//! Any bytes as an encoded delta (header, table and body all fuzzed).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cellswarm_common::delta::Delta::peek_encoding(data);
    let _ = cellswarm_common::delta::Delta::decode(
        data,
        &cellswarm_fuzz::layout(),
        &cellswarm_fuzz::limits(),
    );
});
