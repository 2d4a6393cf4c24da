//! The rules a merge record must pass before a node recomputes it and adopts the result.
//!
//! [`check_record`] holds the rules every path shares (live round and catch-up alike):
//! the record continues the node's chain, names the agreed strategy, carries a quorum of
//! distinct members' deltas none of which was merged before, and is signed by the
//! merger candidate its attempt names. [`check_live`] adds what only a node that saw the
//! round can check: the attempt's turn had come, and the record leaves out no member
//! whose delta the node had held for longer than the slack.
//!
//! Passing the rules is necessary, not sufficient: the node then recomputes the merge
//! from the deltas the record names and adopts the record only if it gets the same model
//! and aggregator state.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use cellswarm_common::ids::{DeltaHash, ModelHash, RecordHash, RoundId, SignerKey};
use cellswarm_common::records::Head;
use cellswarm_common::wire::MergeRecord;

use crate::turns::{Turns, merger_order};

/// Why a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The record was made under another consortium agreement.
    #[error("record of another consortium agreement")]
    OtherConsortium,
    /// The record is not of the round expected next.
    #[error("record of round {got}, expected round {expected}")]
    WrongRound {
        /// The round expected.
        expected: RoundId,
        /// The record's round.
        got: RoundId,
    },
    /// The record does not start from the node's model.
    #[error("round {round} starts from model {}, ours is {}", .got.short(), .expected.short())]
    WrongBase {
        /// The record's round.
        round: RoundId,
        /// Our model.
        expected: ModelHash,
        /// The record's base model.
        got: ModelHash,
    },
    /// The record does not link to the node's previous record.
    #[error("round {round} does not link to our previous record {}", .expected.map(|h| h.short()).unwrap_or_else(|| "(none)".into()))]
    WrongPrev {
        /// The record's round.
        round: RoundId,
        /// Our previous record.
        expected: Option<RecordHash>,
    },
    /// The record names another strategy than the agreed one.
    #[error("strategy {got:?}, the consortium agreed on {expected:?}")]
    Strategy {
        /// The agreed strategy.
        expected: String,
        /// The record's.
        got: String,
    },
    /// Fewer contributions than the quorum.
    #[error("{got} contributions, the quorum is {quorum}")]
    BelowQuorum {
        /// Contributions in the record.
        got: usize,
        /// `rounds.min_peers`.
        quorum: usize,
    },
    /// Contributions out of order, or one member twice.
    #[error("contributions are not sorted by signer, or a signer appears twice")]
    Unsorted,
    /// A contribution signed by a key that is not a member's.
    #[error("a contribution from {} who is not a member", .0.short())]
    NotMember(SignerKey),
    /// A delta merged in an earlier round, or named twice in this one.
    #[error("delta {} was already merged (or is named twice)", .0.short())]
    Replayed(DeltaHash),
    /// The signer is not the candidate the record's attempt names.
    #[error("signed by {} who is not merger candidate {attempt} of this round", .signer.short())]
    NotCandidate {
        /// The record's signer.
        signer: SignerKey,
        /// The record's attempt.
        attempt: u32,
    },
    /// The attempt's turn had not come when the record arrived.
    #[error("attempt {attempt} arrived {elapsed:?} into the round, its turn comes at {earliest:?}")]
    TooEarly {
        /// The record's attempt.
        attempt: u32,
        /// How long our round had run.
        elapsed: Duration,
        /// The earliest time the rules allow for that attempt.
        earliest: Duration,
    },
    /// The record leaves out a member whose delta we had held for longer than the slack.
    #[error("leaves out {}'s delta {}, which we held {age:?} before the record came", .signer.short(), .delta.short())]
    Omitted {
        /// The left-out member.
        signer: SignerKey,
        /// Its delta as we hold it.
        delta: DeltaHash,
        /// How long we had held it.
        age: Duration,
    },
}

/// What a record names as `prev`: the previous round's *outcome* (round, model and
/// aggregator state), not its record's hash. Two merger candidates whose turns overlap
/// sign twin records of one merge (they differ only in signer and attempt); linking
/// outcomes lets either continue the chain, where linking records split the members
/// between the twins and forked the next round. None before round 1.
#[must_use]
pub fn link(head: &Head) -> Option<RecordHash> {
    if head.round.0 == 0 {
        return None;
    }
    let mut b = Vec::with_capacity(18 + 8 + 64);
    b.extend_from_slice(b"cellswarm outcome\0");
    b.extend_from_slice(&head.round.0.to_le_bytes());
    b.extend_from_slice(&head.model.0);
    b.extend_from_slice(&head.state);
    Some(RecordHash::of(&b))
}

/// What the consortium agreed that every record is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The consortium agreement digest.
    pub consortium: [u8; 32],
    /// The agreed merge strategy's name.
    pub strategy: &'a str,
    /// `rounds.min_peers`: contributions a record needs.
    pub quorum: usize,
    /// The members' signing keys.
    pub members: &'a BTreeSet<SignerKey>,
}

/// Where a node's chain stands: the record that comes next must continue it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The round the next record must be of.
    pub round: RoundId,
    /// The model it must start from.
    pub base: ModelHash,
    /// The record it must link to (none before round 1).
    pub prev: Option<RecordHash>,
}

impl Position {
    /// The position after `head`: the next round, from its model, linked to its outcome.
    #[must_use]
    pub fn after(head: &Head) -> Self {
        Self {
            round: head.round.next(),
            base: head.model,
            prev: link(head),
        }
    }
}

/// A delta a node holds for the round being checked: when it came and from whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooled {
    /// The member who signed it.
    pub signer: SignerKey,
    /// Its hash.
    pub delta: DeltaHash,
    /// How long before the record arrived it was pooled.
    pub age: Duration,
    /// How far into our round it was pooled.
    pub at: Duration,
    /// Whether its signer is connected to us (a member that went away may have failed
    /// to deliver its delta to the merger, so its absence proves nothing).
    pub connected: bool,
}

impl Pooled {
    /// Whether an honest merger must have held this delta: its signer is still with us,
    /// and we held it for the slack both before the record came and before the round's
    /// collection deadline (an honest merger merges at that deadline at the latest, and
    /// fetches what it learnt of by then within the slack).
    #[must_use]
    pub fn binds(&self, turns: &Turns) -> bool {
        self.connected
            && self.age >= turns.slack
            && self.at.saturating_add(turns.slack) <= turns.collect
    }
}

/// The rules every record must pass on every path: see the module documentation.
/// `merged` says whether a delta was merged in an earlier round.
///
/// # Errors
/// The first rule the record breaks.
pub fn check_record(
    rules: &Rules<'_>,
    at: &Position,
    record: &MergeRecord,
    signer: SignerKey,
    merged: impl Fn(&DeltaHash) -> bool,
) -> Result<(), RuleError> {
    if record.consortium != rules.consortium {
        return Err(RuleError::OtherConsortium);
    }
    if record.round != at.round {
        return Err(RuleError::WrongRound {
            expected: at.round,
            got: record.round,
        });
    }
    if record.base != at.base {
        return Err(RuleError::WrongBase {
            round: record.round,
            expected: at.base,
            got: record.base,
        });
    }
    if record.prev != at.prev {
        return Err(RuleError::WrongPrev {
            round: record.round,
            expected: at.prev,
        });
    }
    if record.strategy != rules.strategy {
        return Err(RuleError::Strategy {
            expected: rules.strategy.to_owned(),
            got: record.strategy.clone(),
        });
    }
    let c = &record.contributions;
    if c.len() < rules.quorum.max(1) {
        return Err(RuleError::BelowQuorum {
            got: c.len(),
            quorum: rules.quorum.max(1),
        });
    }
    if !c.windows(2).all(|w| w[0].signer < w[1].signer) {
        return Err(RuleError::Unsorted);
    }
    if let Some(x) = c.iter().find(|x| !rules.members.contains(&x.signer)) {
        return Err(RuleError::NotMember(x.signer));
    }
    let mut seen = HashSet::with_capacity(c.len());
    if let Some(x) = c.iter().find(|x| merged(&x.delta) || !seen.insert(x.delta)) {
        return Err(RuleError::Replayed(x.delta));
    }
    let order = merger_order(record.round, c.iter().map(|x| x.signer));
    let candidate = Turns::candidate(record.attempt, order.len()).map(|i| order[i]);
    if candidate != Some(signer) {
        return Err(RuleError::NotCandidate {
            signer,
            attempt: record.attempt,
        });
    }
    Ok(())
}

/// The rules of [`check_record`], and those only a node that saw the round can check:
/// the record arrived `elapsed` after our round started, no earlier than its attempt's
/// turn allows, and names every member in `pool` whose delta we had held for at least
/// the slack, that reached us the slack before the collection deadline, and whose
/// signer is still connected ([`Pooled::binds`]; a member named with another delta than
/// ours equivocated: the record's is fetched and checked like any other).
///
/// # Errors
/// The first rule the record breaks.
#[allow(clippy::too_many_arguments)]
pub fn check_live(
    rules: &Rules<'_>,
    at: &Position,
    record: &MergeRecord,
    signer: SignerKey,
    merged: impl Fn(&DeltaHash) -> bool,
    turns: &Turns,
    elapsed: Duration,
    pool: &[Pooled],
) -> Result<(), RuleError> {
    check_record(rules, at, record, signer, merged)?;
    let earliest = turns.earliest(record.attempt);
    if elapsed < earliest {
        return Err(RuleError::TooEarly {
            attempt: record.attempt,
            elapsed,
            earliest,
        });
    }
    must_include(record, pool, turns)
}

/// Refuses a record that leaves out a member of `pool` whose delta binds the merger
/// ([`Pooled::binds`]).
///
/// # Errors
/// [`RuleError::Omitted`] for the first such member.
pub fn must_include(record: &MergeRecord, pool: &[Pooled], turns: &Turns) -> Result<(), RuleError> {
    match omitted(record, pool, turns).next() {
        Some(p) => Err(RuleError::Omitted {
            signer: p.signer,
            delta: p.delta,
            age: p.age,
        }),
        None => Ok(()),
    }
}

/// The members of `pool` whose delta binds the merger ([`Pooled::binds`]) and that
/// `record` leaves out, in signer order.
pub fn omitted<'a>(
    record: &'a MergeRecord,
    pool: &'a [Pooled],
    turns: &'a Turns,
) -> impl Iterator<Item = &'a Pooled> + 'a {
    pool.iter().filter(move |p| {
        p.binds(turns)
            && record
                .contributions
                .binary_search_by(|c| c.signer.cmp(&p.signer))
                .is_err()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cellswarm_common::wire::Contribution;

    pub(crate) fn key(b: u8) -> SignerKey {
        SignerKey([b; 32])
    }

    pub(crate) fn members(n: u8) -> BTreeSet<SignerKey> {
        (1..=n).map(key).collect()
    }

    /// A record of `round` over the deltas of `signers`, signed correctly: the signer
    /// its attempt names is returned with it.
    pub(crate) fn record(at: &Position, signers: &[u8], attempt: u32) -> (MergeRecord, SignerKey) {
        let mut contributions: Vec<Contribution> = signers
            .iter()
            .map(|&s| Contribution {
                signer: key(s),
                delta: DeltaHash::of(&[s, at.round.0 as u8]),
                sample_count: 10,
            })
            .collect();
        contributions.sort();
        let order = merger_order(at.round, contributions.iter().map(|c| c.signer));
        let signer = order[attempt as usize % order.len()];
        (
            MergeRecord {
                consortium: [7; 32],
                round: at.round,
                base: at.base,
                prev: at.prev,
                strategy: "fedavg".into(),
                contributions,
                model: ModelHash::of(&[at.round.0 as u8, 1]),
                state: [0; 32],
                attempt,
            },
            signer,
        )
    }

    pub(crate) fn start() -> Position {
        Position {
            round: RoundId(1),
            base: ModelHash::of(b"genesis"),
            prev: None,
        }
    }

    fn check(at: &Position, r: &MergeRecord, signer: SignerKey) -> Result<(), RuleError> {
        let m = members(4);
        let rules = Rules {
            consortium: [7; 32],
            strategy: "fedavg",
            quorum: 2,
            members: &m,
        };
        check_record(&rules, at, r, signer, |_| false)
    }

    #[test]
    fn an_honest_record_passes() {
        let at = start();
        for attempt in 0..6 {
            let (r, s) = record(&at, &[1, 2, 3], attempt);
            assert_eq!(check(&at, &r, s), Ok(()));
        }
    }

    #[test]
    fn a_record_that_does_not_continue_the_chain_is_refused() {
        let at = start();
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.round = RoundId(2);
        assert!(matches!(
            check(&at, &r, s),
            Err(RuleError::WrongRound { .. })
        ));
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.base = ModelHash::of(b"other");
        assert!(matches!(
            check(&at, &r, s),
            Err(RuleError::WrongBase { .. })
        ));
        // The hole of cd22ef9: a record with the right base but another previous record
        // was only logged.
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.prev = Some(RecordHash::of(b"a fork"));
        assert!(matches!(
            check(&at, &r, s),
            Err(RuleError::WrongPrev { .. })
        ));
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.consortium = [8; 32];
        assert_eq!(check(&at, &r, s), Err(RuleError::OtherConsortium));
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.strategy = "median".into();
        assert!(matches!(check(&at, &r, s), Err(RuleError::Strategy { .. })));
    }

    #[test]
    fn contributions_need_a_quorum_of_distinct_members_and_fresh_deltas() {
        let at = start();
        let (r, s) = record(&at, &[1], 0);
        assert!(matches!(
            check(&at, &r, s),
            Err(RuleError::BelowQuorum { got: 1, quorum: 2 })
        ));
        let (r, s) = record(&at, &[1, 9], 0);
        assert_eq!(check(&at, &r, s), Err(RuleError::NotMember(key(9))));
        let (mut r, s) = record(&at, &[1, 2], 0);
        r.contributions.swap(0, 1);
        assert_eq!(check(&at, &r, s), Err(RuleError::Unsorted));
        // One member's delta re-signed by another counts once at most.
        let (mut r, s) = record(&at, &[1, 2, 3], 0);
        r.contributions[2].delta = r.contributions[0].delta;
        assert_eq!(
            check(&at, &r, s),
            Err(RuleError::Replayed(r.contributions[0].delta))
        );
        let (r, s) = record(&at, &[1, 2, 3], 0);
        let old = r.contributions[1].delta;
        let m = members(4);
        let rules = Rules {
            consortium: [7; 32],
            strategy: "fedavg",
            quorum: 2,
            members: &m,
        };
        assert_eq!(
            check_record(&rules, &at, &r, s, |d| *d == old),
            Err(RuleError::Replayed(old))
        );
    }

    #[test]
    fn only_the_named_candidate_may_sign() {
        let at = start();
        let (r, s) = record(&at, &[1, 2, 3], 1);
        let other = (1..=3).map(key).find(|k| *k != s).unwrap();
        assert!(matches!(
            check(&at, &r, other),
            Err(RuleError::NotCandidate { attempt: 1, .. })
        ));
    }

    /// Hole 2 of issue 15: a member published at once, as whatever candidate it liked,
    /// a record over the subset of deltas it chose.
    #[test]
    fn a_merger_can_neither_jump_the_turns_nor_choose_the_deltas() {
        let m = members(4);
        let rules = Rules {
            consortium: [7; 32],
            strategy: "fedavg",
            quorum: 2,
            members: &m,
        };
        let turns = Turns::new(Duration::from_secs(60), Duration::from_secs(10));
        let at = start();
        let pool: Vec<Pooled> = [1u8, 2, 3, 4]
            .iter()
            .map(|&s| Pooled {
                signer: key(s),
                delta: DeltaHash::of(&[s, 1]),
                age: Duration::from_secs(8),
                at: Duration::from_secs(1),
                connected: true,
            })
            .collect();
        // Candidate 2 publishing 1 s into the round: its turn comes at 15 s.
        let (r, s) = record(&at, &[1, 2, 3, 4], 2);
        let early = check_live(
            &rules,
            &at,
            &r,
            s,
            |_| false,
            &turns,
            Duration::from_secs(1),
            &pool,
        );
        assert!(matches!(early, Err(RuleError::TooEarly { attempt: 2, .. })));
        assert_eq!(
            check_live(
                &rules,
                &at,
                &r,
                s,
                |_| false,
                &turns,
                Duration::from_secs(15),
                &pool
            ),
            Ok(())
        );
        // A record over a chosen subset that leaves out a delta we held for 8 s.
        let (r, s) = record(&at, &[1, 2, 3], 0);
        assert!(matches!(
            check_live(
                &rules,
                &at,
                &r,
                s,
                |_| false,
                &turns,
                Duration::from_secs(9),
                &pool
            ),
            Err(RuleError::Omitted { .. })
        ));
        // A delta that reached us just now may be missing from an honest record.
        let mut fresh = pool.clone();
        fresh[3].age = Duration::from_secs(1);
        let (r, s) = record(&at, &[1, 2, 3], 0);
        assert_eq!(
            check_live(
                &rules,
                &at,
                &r,
                s,
                |_| false,
                &turns,
                Duration::from_secs(9),
                &fresh
            ),
            Ok(())
        );
        // So may the delta of a member that went away, or one that came after the
        // collection deadline.
        let mut gone = pool.clone();
        gone[3].connected = false;
        assert!(
            check_live(
                &rules,
                &at,
                &r,
                s,
                |_| false,
                &turns,
                Duration::from_secs(9),
                &gone
            )
            .is_ok()
        );
        let mut late = pool.clone();
        late[3].at = Duration::from_secs(58);
        assert!(
            check_live(
                &rules,
                &at,
                &r,
                s,
                |_| false,
                &turns,
                Duration::from_secs(70),
                &late
            )
            .is_ok()
        );
    }
}

#[cfg(test)]
mod properties {
    use super::tests::{key, members, record};
    use super::*;
    use proptest::prelude::*;

    /// One way a record can differ from the honest one.
    #[derive(Debug, Clone, Copy)]
    enum Lie {
        Round,
        Base,
        Prev,
        Consortium,
        Strategy,
        TooFew,
        Outsider,
        Signer,
        Replay,
        Twice,
    }

    fn lie() -> impl Strategy<Value = Lie> {
        prop_oneof![
            Just(Lie::Round),
            Just(Lie::Base),
            Just(Lie::Prev),
            Just(Lie::Consortium),
            Just(Lie::Strategy),
            Just(Lie::TooFew),
            Just(Lie::Outsider),
            Just(Lie::Signer),
            Just(Lie::Replay),
            Just(Lie::Twice),
        ]
    }

    proptest! {
        /// Every honest record passes, at any round, attempt and subset of at least a
        /// quorum of members; every record that differs from it in one way is refused.
        #[test]
        fn honest_records_pass_and_any_single_lie_is_refused(
            round in 1u64..1_000,
            attempt in 0u32..20,
            subset in proptest::collection::btree_set(1u8..=7, 3..=7),
            lie in lie(),
        ) {
            let m = members(7);
            let rules = Rules { consortium: [7; 32], strategy: "fedavg", quorum: 3, members: &m };
            let at = Position {
                round: RoundId(round),
                base: ModelHash::of(&round.to_le_bytes()),
                prev: Some(RecordHash::of(&round.to_be_bytes())),
            };
            let signers: Vec<u8> = subset.into_iter().collect();
            let (mut r, mut signer) = record(&at, &signers, attempt);
            prop_assert_eq!(check_record(&rules, &at, &r, signer, |_| false), Ok(()));
            let mut replayed = None;
            match lie {
                Lie::Round => r.round = RoundId(round + 1),
                Lie::Base => r.base = ModelHash::of(b"another model"),
                Lie::Prev => r.prev = None,
                Lie::Consortium => r.consortium = [8; 32],
                Lie::Strategy => r.strategy = "median".into(),
                Lie::TooFew => r.contributions.truncate(2),
                Lie::Outsider => {
                    r.contributions[0].signer = key(0);
                    r.contributions.sort();
                }
                Lie::Signer => {
                    signer = r
                        .contributions
                        .iter()
                        .map(|c| c.signer)
                        .find(|s| *s != signer)
                        .unwrap_or(key(9));
                }
                Lie::Replay => replayed = Some(r.contributions[1].delta),
                Lie::Twice => r.contributions[1].delta = r.contributions[0].delta,
            }
            let merged = |d: &DeltaHash| Some(*d) == replayed;
            prop_assert!(check_record(&rules, &at, &r, signer, merged).is_err(), "{lie:?} passed");
        }
    }
}
