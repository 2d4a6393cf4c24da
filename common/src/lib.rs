//! `cellswarm-common`: the vocabulary every cellswarm crate shares.
//!
//! - [`weights::Weights`]: a model's parameters as named f32 tensors in canonical order,
//!   with a SHA-256 content hash ([`ids::ModelHash`]) over a documented byte layout.
//! - [`delta::Delta`]: the difference between two models, with the `F32`, `F16`, `Int8`
//!   and `TopK` [`delta::DeltaEncoding`]s and decoders that validate before allocating.
//! - [`envelope`]: signed bytes with a verify-then-read API
//!   ([`envelope::UnverifiedEnvelope`] → [`envelope::VerifiedEnvelope`]).
//! - [`identity::Identity`]: one Ed25519 seed per node, giving both the ring signing key
//!   and the libp2p key pair, so a PeerId names the key that signs.
//! - [`config`]: the TOML schema of a node and its consortium, with validation whose
//!   errors name the file, the field and the problem.
//! - [`wire`]: versioned control messages (bincode 2 with a size limit) and frames.
//! - [`protocol`]: protocol ids and topic names.
//!
//! This crate does no networking and does not depend on burn.
//!
//! ```no_run
//! use cellswarm_common::delta::{Delta, DeltaEncoding, DeltaLimits};
//! use cellswarm_common::envelope::{self, MemberKeys, PayloadKind, UnverifiedEnvelope};
//! use cellswarm_common::identity::Identity;
//! use cellswarm_common::weights::Weights;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let me = Identity::load_key_file("site-a/identity.key".as_ref())?;
//! let base = Weights::from_tensors([("conv.weight", vec![2, 2], vec![0.0; 4])])?;
//! let trained = Weights::from_tensors([("conv.weight", vec![2, 2], vec![0.1, 0.0, -0.2, 0.3])])?;
//! let delta = Delta::between(&base, &trained)?;
//! let sealed = envelope::seal(&me, PayloadKind::Delta, &delta.encode(DeltaEncoding::F16)?);
//!
//! // On the receiving side: verify first, then read.
//! let members = MemberKeys::new([me.signer_key()]);
//! let opened = UnverifiedEnvelope::parse(sealed, 1 << 30)?.verify(PayloadKind::Delta, &members)?;
//! let received = Delta::decode(opened.payload(), base.layout(), &DeltaLimits::default())?;
//! let next = received.apply(&base)?;
//! println!("{}", next.hash());
//! # Ok(()) }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

pub mod bytes;
pub mod config;
pub mod delta;
pub mod envelope;
pub mod identity;
pub mod ids;
pub mod protocol;
pub mod records;
pub mod weights;
pub mod wire;
