//! Commit certificates: a round's record adopted on the word of enough members.
//!
//! After a member commits a round whose record it checked itself (it recomputed the
//! merge, or it was the merger), it signs an attestation `(round, record hash, model
//! hash, state hash)` and sends it to the others, who keep it. A node that cannot check a
//! record itself (the deltas are gone, the round was masked, or it refused the record on
//! a view of the round the others did not share) adopts it when `threshold` distinct
//! members attest to its model and aggregator state for that round: with at most
//! `aggregation.byzantine` liars among them, at least one honest member checked a record
//! that gives exactly that model and state.
//!
//! The count is over (round, model, state), not the record hash: two candidates that
//! merge the same deltas at once (a race of their clocks) sign two records that differ
//! only in signer and attempt, and the members split between them; both give the same
//! model and state, which is what a node adopts.

use std::collections::{BTreeSet, HashSet};

use cellswarm_common::ids::{ModelHash, RecordHash, RoundId, SignerKey};

/// One member's attestation, as decoded from its signed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attestation {
    /// The member who signed it.
    pub signer: SignerKey,
    /// The round.
    pub round: RoundId,
    /// The record it attests.
    pub record: RecordHash,
    /// The model that record gives.
    pub model: ModelHash,
    /// The aggregator state after it.
    pub state: [u8; 32],
}

/// Attestations a certificate needs: one more than the liars the consortium is built to
/// survive (`aggregation.byzantine`), at least two where there are two members, never
/// more than there are members.
#[must_use]
pub fn threshold(members: usize, byzantine: u32) -> usize {
    (byzantine as usize)
        .saturating_add(1)
        .max(2)
        .min(members.max(1))
}

/// Whether `attestations` certify the outcome of `round` as `model` and `state`: at
/// least `threshold` distinct members attest to a record of that round giving exactly
/// them. Attestations from non-members or about anything else are ignored.
#[must_use]
pub fn certified(
    round: RoundId,
    model: ModelHash,
    state: [u8; 32],
    attestations: &[Attestation],
    members: &BTreeSet<SignerKey>,
    threshold: usize,
) -> bool {
    let signers: HashSet<SignerKey> = attestations
        .iter()
        .filter(|a| {
            a.round == round && a.model == model && a.state == state && members.contains(&a.signer)
        })
        .map(|a| a.signer)
        .collect();
    signers.len() >= threshold.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SignerKey {
        SignerKey([b; 32])
    }

    fn att(s: u8, record: RecordHash) -> Attestation {
        Attestation {
            signer: key(s),
            round: RoundId(4),
            record,
            model: ModelHash::of(b"m4"),
            state: [4; 32],
        }
    }

    #[test]
    fn thresholds_outnumber_the_liars_the_consortium_survives() {
        assert_eq!(threshold(3, 1), 2);
        assert_eq!(threshold(10, 3), 4);
        assert_eq!(threshold(3, 0), 2);
        assert_eq!(threshold(2, 5), 2);
        assert_eq!(threshold(1, 1), 1);
    }

    #[test]
    fn a_certificate_needs_distinct_members_attesting_the_same_outcome() {
        let members: BTreeSet<SignerKey> = (1..=4).map(key).collect();
        let r = RecordHash::of(b"r4");
        let m = ModelHash::of(b"m4");
        let ok = |a: &[Attestation]| certified(RoundId(4), m, [4; 32], a, &members, 2);
        assert!(ok(&[att(1, r), att(2, r)]));
        // One liar repeating itself is one attestation.
        assert!(!ok(&[att(1, r), att(1, r), att(1, r)]));
        // Two records of the same merge (two candidates raced) certify their outcome.
        let twin = RecordHash::of(b"twin");
        assert!(ok(&[att(1, r), att(2, twin)]));
        // Another state, round or model, or outsiders, do not count.
        let mut other_state = att(2, r);
        other_state.state = [9; 32];
        assert!(!ok(&[att(1, r), other_state]));
        let mut wrong_round = att(2, r);
        wrong_round.round = RoundId(5);
        assert!(!ok(&[att(1, r), wrong_round]));
        let mut wrong_model = att(2, r);
        wrong_model.model = ModelHash::of(b"x");
        assert!(!ok(&[att(1, r), wrong_model]));
        assert!(!ok(&[att(1, r), att(9, r)]));
    }
}
