//! Whose turn it is to merge a round, and from when.
//!
//! The contributors of a round are ordered by SHA-256(signer ‖ round); candidate `a`
//! merges `a × merge_timeout` after its collection completed unless a record arrived
//! first, and after every candidate had a turn the turns start again. A verifier checks
//! both halves: the record's signer must be the candidate its `attempt` names, and the
//! attempt must not come before its time (with slack for the members' clocks and round
//! starts, which differ by about one merge and one fetch).

use std::time::Duration;

use cellswarm_common::ids::{ModelHash, RoundId, SignerKey};

/// Merger candidates of round `round` among `signers`: ordered by SHA-256(signer ‖ round).
#[must_use]
pub fn merger_order(
    round: RoundId,
    signers: impl IntoIterator<Item = SignerKey>,
) -> Vec<SignerKey> {
    let mut v: Vec<(ModelHash, SignerKey)> = signers
        .into_iter()
        .map(|s| {
            let mut b = s.0.to_vec();
            b.extend_from_slice(&round.0.to_le_bytes());
            (ModelHash::of(&b), s)
        })
        .collect();
    v.sort();
    v.dedup_by(|a, b| a.1 == b.1);
    v.into_iter().map(|(_, s)| s).collect()
}

/// The timing of merger turns: how long each candidate has, and the slack a verifier
/// allows for members whose rounds started at other moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turns {
    /// `rounds.collect_timeout`: how long a round collects deltas before its first
    /// candidate merges whatever it has (a candidate merges earlier once every member it
    /// is connected to delivered).
    pub collect: Duration,
    /// `rounds.merge_timeout`: the length of one candidate's turn.
    pub merge_timeout: Duration,
    /// How much earlier than its time a turn is still believed.
    pub slack: Duration,
}

impl Turns {
    /// Turns of `merge_timeout` with half a turn of slack: members start a round when
    /// they commit the previous one, the merger first and its verifiers one recomputed
    /// merge and one fetch later, so a verifier's clock runs behind the merger's.
    #[must_use]
    pub fn new(collect: Duration, merge_timeout: Duration) -> Self {
        Self {
            collect,
            merge_timeout,
            slack: merge_timeout / 2,
        }
    }

    /// The earliest time, after the verifier's round started, at which a record of
    /// `attempt` may arrive.
    #[must_use]
    pub fn earliest(&self, attempt: u32) -> Duration {
        self.merge_timeout
            .saturating_mul(attempt)
            .saturating_sub(self.slack)
    }

    /// The attempt whose turn it is `since_ready` after a candidate's collection
    /// completed.
    #[must_use]
    pub fn attempt_at(&self, since_ready: Duration) -> u32 {
        let turn = self.merge_timeout.as_secs_f64().max(1e-3);
        (since_ready.as_secs_f64() / turn).min(f64::from(u32::MAX)) as u32
    }

    /// The candidate (index into the merger order) that `attempt` names among `n`.
    #[must_use]
    pub fn candidate(attempt: u32, n: usize) -> Option<usize> {
        (n > 0).then(|| attempt as usize % n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SignerKey {
        SignerKey([b; 32])
    }

    #[test]
    fn the_order_is_a_function_of_round_and_signers_only() {
        let a = merger_order(RoundId(3), [key(1), key(2), key(3)]);
        let b = merger_order(RoundId(3), [key(3), key(1), key(2), key(2)]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        // Another round gives (for these keys) another first candidate at least once.
        let firsts: std::collections::BTreeSet<SignerKey> = (1..20)
            .map(|r| merger_order(RoundId(r), [key(1), key(2), key(3)])[0])
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn turns_come_one_timeout_apart_less_the_slack() {
        let t = Turns::new(Duration::from_secs(600), Duration::from_secs(120));
        assert_eq!(t.earliest(0), Duration::ZERO);
        assert_eq!(t.earliest(1), Duration::from_secs(60));
        assert_eq!(t.earliest(3), Duration::from_secs(300));
        assert_eq!(t.attempt_at(Duration::from_secs(119)), 0);
        assert_eq!(t.attempt_at(Duration::from_secs(241)), 2);
        // An honest candidate's attempt is never refused, even by a verifier whose round
        // started up to the slack after the candidate's collection completed.
        for secs in 0..1000 {
            let since_ready = Duration::from_secs(secs);
            let verifier_elapsed = since_ready.saturating_sub(t.slack);
            assert!(t.earliest(t.attempt_at(since_ready)) <= verifier_elapsed);
        }
        assert_eq!(
            t.earliest(u32::MAX),
            Duration::from_secs(120) * u32::MAX - t.slack
        );
        assert_eq!(Turns::candidate(7, 3), Some(1));
        assert_eq!(Turns::candidate(0, 0), None);
    }
}
