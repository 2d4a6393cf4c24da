//! Deltas being fetched: each from a list of members asked one after the other (who
//! announced or named it first, then everyone else we are connected to), and those that
//! nobody we asked had. Shared by the live round and catch-up.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cellswarm_common::ids::{DeltaHash, SignerKey};

/// What to do after one member could not give us a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Ask this member.
    Ask(SignerKey),
    /// Nobody had it (now counted as failed).
    Failed,
    /// We were not fetching it.
    Unknown,
}

/// The fetches of one round, or of one catch-up record.
#[derive(Debug, Default)]
pub(super) struct Fetches {
    /// By delta: the members still to ask after the one asked now.
    asking: BTreeMap<DeltaHash, VecDeque<SignerKey>>,
    failed: BTreeSet<DeltaHash>,
}

impl Fetches {
    /// Whether `hash` is being fetched.
    pub(super) fn asking(&self, hash: &DeltaHash) -> bool {
        self.asking.contains_key(hash)
    }

    /// Whether nobody we asked had `hash`.
    pub(super) fn failed(&self, hash: &DeltaHash) -> bool {
        self.failed.contains(hash)
    }

    /// Fetches in flight.
    pub(super) fn len(&self) -> usize {
        self.asking.len()
    }

    /// Items held.
    pub(super) fn footprint(&self) -> usize {
        self.asking.values().map(|q| 1 + q.len()).sum::<usize>() + self.failed.len()
    }

    /// Forgets which deltas nobody had (they are asked for again).
    pub(super) fn forget_failures(&mut self) {
        self.failed.clear();
    }

    /// Starts fetching `hash` from `peers` in that order (repeats and `me` left out):
    /// the member to ask first, or none if it is fetched already, failed, or there is
    /// nobody to ask.
    pub(super) fn start(
        &mut self,
        hash: DeltaHash,
        peers: impl IntoIterator<Item = SignerKey>,
        me: SignerKey,
    ) -> Option<SignerKey> {
        if self.asking(&hash) || self.failed(&hash) {
            return None;
        }
        let mut queue: VecDeque<SignerKey> = VecDeque::new();
        for p in peers {
            if p != me && !queue.contains(&p) {
                queue.push_back(p);
            }
        }
        let first = queue.pop_front()?;
        self.asking.insert(hash, queue);
        Some(first)
    }

    /// `hash` arrived: the fetch is over.
    pub(super) fn done(&mut self, hash: &DeltaHash) {
        self.asking.remove(hash);
    }

    /// The member asked for `hash` did not give it: who to ask next.
    pub(super) fn next(&mut self, hash: DeltaHash) -> Next {
        let Some(rest) = self.asking.get_mut(&hash) else {
            return Next::Unknown;
        };
        match rest.pop_front() {
            Some(p) => Next::Ask(p),
            None => {
                self.asking.remove(&hash);
                self.failed.insert(hash);
                Next::Failed
            }
        }
    }
}
