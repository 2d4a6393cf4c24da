//! `cellswarm-aggregator`: merging a base model and verified updates into the next model.
//! Pure computation: no I/O, no tokio, no burn, no libp2p.
