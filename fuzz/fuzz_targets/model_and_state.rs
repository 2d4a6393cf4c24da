//! Model bytes (from peers and blobs) and aggregator state bytes (from peers and disk).
#![no_main]

use cellswarm_aggregator::Merger;
use cellswarm_common::config::{AggregationConfig, StrategyKind};
use cellswarm_common::weights::Weights;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Weights::from_bytes(data, &cellswarm_fuzz::limits().layout);
    for strategy in [StrategyKind::FedAvg, StrategyKind::FedAdam] {
        if let Ok(mut m) = Merger::from_config(&AggregationConfig {
            strategy,
            ..AggregationConfig::default()
        }) {
            let _ = m.load_state(data, &cellswarm_fuzz::layout());
        }
    }
});
