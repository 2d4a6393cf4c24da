//! Shared set-up of the fuzz targets: the layout a receiver expects and the limits.

use std::sync::Arc;

use cellswarm_common::delta::{DELTA_MAGIC, DELTA_VERSION, DeltaLimits};
use cellswarm_common::weights::{Layout, Limits};

/// The layout every delta target decodes against (3 tensors, 251 values).
pub fn layout() -> Arc<Layout> {
    Arc::new(
        Layout::new([
            ("conv.w".to_owned(), vec![4, 3, 3, 3]),
            ("conv.b".to_owned(), vec![4]),
            ("head.w".to_owned(), vec![139]),
        ])
        .expect("a valid layout"),
    )
}

/// Limits as a node configures them, scaled to the fuzzer's inputs.
pub fn limits() -> DeltaLimits {
    DeltaLimits {
        max_bytes: 1 << 20,
        layout: Limits {
            max_tensors: 64,
            max_params: 1 << 16,
        },
    }
}

/// A valid delta header for `encoding` (0 F32, 1 F16, 2 Int8, 3 TopK) and the layout's
/// table, so that the fuzzer's bytes land in the body decoder of that encoding.
pub fn delta_prefix(encoding: u8) -> Vec<u8> {
    let mut out = DELTA_MAGIC.to_vec();
    out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
    out.push(encoding);
    out.push(0);
    out.extend_from_slice(layout().table_bytes());
    out
}

/// Decodes a delta body of `encoding` made of `data`: must not panic.
///
/// When the first byte is even, the rest is cycled or cut to the exact length the
/// encoding needs (for top-k, with a matching count), so most inputs reach the value
/// checks instead of stopping at the length check; odd first bytes keep any length.
pub fn delta_body(encoding: u8, data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let layout = layout();
    let p = layout.total();
    let t = layout.entries().len();
    let body: Vec<u8> = if mode % 2 == 1 || rest.is_empty() {
        rest.to_vec()
    } else {
        let fit = |n: usize| rest.iter().copied().cycle().take(n).collect::<Vec<u8>>();
        match encoding {
            0 => fit(4 * p),
            1 => fit(2 * p),
            2 => fit(4 * t + p),
            _ => {
                let k = (rest.len() / 8).clamp(1, p);
                let mut b = (k as u64).to_le_bytes().to_vec();
                b.extend(fit(8 * k));
                b
            }
        }
    };
    let mut bytes = delta_prefix(encoding);
    bytes.extend_from_slice(&body);
    let _ = cellswarm_common::delta::Delta::decode(&bytes, &layout, &limits());
}
