//! Cell states read along tracks instead of frame by frame.
//!
//! The model's state head sees one frame. A cell in its first dying frame looks like a
//! fresh daughter (smaller and dimmer than its neighbours), and a cell that rounds up for
//! a frame looks dividing; the head cannot tell them apart, the track can: a dying cell
//! has a long history, keeps shrinking and then vanishes inside the field of view; a
//! dividing cell's track ends in two daughters; a daughter begins in interphase.
//!
//! [`decode`] reads each lineage branch (a track and the gap-closed continuations that
//! name it as their only child) as a hidden Markov chain over the three states
//! `interphase -> dividing -> (two daughters)` and `interphase -> dying -> (gone)`, and
//! picks the most probable sequence of states (Viterbi):
//!
//! - **per frame**, the head's probabilities averaged over the object's pixels. Trained
//!   with state weights `1 / frequency` (`train::state_weights`), the head's output is
//!   proportional to `p(state | pixels) / p(state)`, a likelihood, which is what a
//!   hidden Markov chain multiplies;
//! - **between frames**, a state changes with probability [`StateRules::change`]; dying
//!   never ends; dividing ends only in the division (or, with that same probability,
//!   where the division was not seen);
//! - **shrinking**: an object that lost area since the previous frame (both away from the
//!   border) adds evidence for dying, one that grew against it
//!   ([`StateRules::shrink`]);
//! - **how the branch ends**: in two daughters, the last frame is most likely dividing;
//!   vanished inside the field before the movie's last frame, most likely dying
//!   ([`StateRules::end_evidence`]); at the border or in the last frame, no evidence;
//! - **how it begins**: a daughter begins in interphase but with probability `change`.
//!
//! docs/tracking.md ("Cell states along tracks") gives the measurements.

use std::collections::{BTreeMap, HashMap};

use crate::data::ctc::TrackRecord;

/// Index of `interphase` in the model's state head.
const INTERPHASE: usize = 0;
/// Index of `dividing`.
const DIVIDING: usize = 1;
/// Index of `dying`.
const DYING: usize = 2;
/// The decoded states (the model's three, in its order).
const STATES: usize = 3;
/// Floor of a state probability before its logarithm (a head's 0 is not certainty).
const FLOOR: f64 = 1e-4;

/// The priors of the decoding (defaults: [`StateRules::default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateRules {
    /// Probability of a change of state from one frame to the next: from interphase to
    /// dividing or to dying (each), and from dividing back to interphase where a division
    /// was not seen. Not the biological rate (a few per cent a frame) but how readily the
    /// decoding follows the head: lower smooths more; the default keeps every state's
    /// recall at or above the frame's own reading on the synthetic movies measured.
    pub change: f64,
    /// How many times more likely the last state of a branch is dying when the branch
    /// vanishes inside the field of view, and dividing when it ends in two daughters,
    /// than any other state (a tracker also loses cells, and sees divisions that are not).
    pub end_evidence: f64,
    /// Area ratio to the previous frame at which shrinking counts neither for nor
    /// against dying; each 5 % below it multiplies the evidence for dying by `e`, each
    /// 5 % above it divides it by `e`, up to `e^2` either way. 0 turns shrinking off.
    pub shrink: f64,
}

impl Default for StateRules {
    fn default() -> Self {
        Self {
            change: 0.2,
            end_evidence: 10.0,
            shrink: 0.9,
        }
    }
}

/// One object of one frame, as the decoding sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Frame number (as in the masks' file names and `res_track.txt`).
    pub frame: u32,
    /// Its track label.
    pub label: u32,
    /// The state head's probabilities averaged over its pixels (interphase, dividing,
    /// dying).
    pub probabilities: [f32; 3],
    /// Voxels.
    pub area: u64,
    /// Whether it touches the border of the field of view.
    pub at_border: bool,
}

/// How a branch of a lineage ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// In two or more daughters.
    Divided,
    /// Inside the field of view before the last frame, without daughters.
    Vanished,
    /// In the last frame, at the border or without a last observation: no evidence.
    Open,
}

/// The most probable state of every observation (index into interphase, dividing,
/// dying), keyed by `(frame, label)`. Observations of labels that no track record names
/// keep the head's most probable state. `last_frame` is the movie's last frame.
#[must_use]
pub fn decode(
    observations: &[Observation],
    tracks: &[TrackRecord],
    last_frame: u32,
    rules: &StateRules,
) -> BTreeMap<(u32, u32), usize> {
    let mut by_label: HashMap<u32, Vec<&Observation>> = HashMap::new();
    for o in observations {
        by_label.entry(o.label).or_default().push(o);
    }
    for v in by_label.values_mut() {
        v.sort_by_key(|o| o.frame);
    }
    let known: HashMap<u32, &TrackRecord> = tracks.iter().map(|t| (t.label, t)).collect();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for t in tracks {
        if t.parent != 0 && known.contains_key(&t.parent) {
            children.entry(t.parent).or_default().push(t.label);
        }
    }
    for c in children.values_mut() {
        c.sort_unstable();
    }
    let kids = |l: u32| children.get(&l).map_or(0, Vec::len);

    let mut out = BTreeMap::new();
    let mut sorted: Vec<&TrackRecord> = tracks.iter().collect();
    sorted.sort_by_key(|t| (t.begin, t.label));
    for t in sorted {
        // A branch starts at a track that does not continue its parent's single branch.
        let continues = t.parent != 0 && kids(t.parent) == 1;
        if continues {
            continue;
        }
        let daughter = t.parent != 0 && kids(t.parent) >= 2;
        let mut branch: Vec<&Observation> = Vec::new();
        let mut label = t.label;
        let mut seen = 0usize;
        loop {
            branch.extend(by_label.get(&label).into_iter().flatten());
            seen += 1;
            match children.get(&label).map(Vec::as_slice) {
                Some([only]) if seen <= tracks.len() => label = *only,
                _ => break,
            }
        }
        let end = match branch.last() {
            _ if kids(label) >= 2 => End::Divided,
            Some(o) if o.frame < last_frame && !o.at_border => End::Vanished,
            _ => End::Open,
        };
        for (o, s) in branch.iter().zip(viterbi(&branch, daughter, end, rules)) {
            out.insert((o.frame, o.label), s);
        }
    }
    for o in observations {
        out.entry((o.frame, o.label))
            .or_insert_with(|| most_probable(&o.probabilities));
    }
    out
}

/// Index of the largest value (the first of equals).
fn most_probable<T: PartialOrd>(p: &[T]) -> usize {
    let mut best = 0;
    for (c, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = c;
        }
    }
    best
}

/// Evidence for dying from an area ratio (natural log of a likelihood ratio).
fn shrink_evidence(ratio: f64, rules: &StateRules) -> f64 {
    if rules.shrink <= 0.0 || ratio <= 0.0 || !ratio.is_finite() {
        return 0.0;
    }
    ((rules.shrink.ln() - ratio.ln()) / 0.05).clamp(-2.0, 2.0)
}

/// The most probable state sequence of one branch (observations in frame order).
fn viterbi(branch: &[&Observation], daughter: bool, end: End, rules: &StateRules) -> Vec<usize> {
    if branch.is_empty() {
        return Vec::new();
    }
    let eps = rules.change.clamp(1e-9, 0.3);
    let stay = (1.0 - 2.0 * eps).ln();
    let change = eps.ln();
    // trans[from][to]
    let never = f64::NEG_INFINITY;
    let trans = [
        [stay, change, change],
        [change, (1.0 - eps).ln(), never],
        [never, never, 0.0],
    ];
    let emit = |k: usize| -> [f64; STATES] {
        let o = branch[k];
        let mut e = [0.0; STATES];
        for (s, v) in e.iter_mut().enumerate() {
            *v = f64::from(o.probabilities[s]).max(FLOOR).ln();
        }
        if k > 0 {
            let p = branch[k - 1];
            if p.frame + 1 == o.frame && !p.at_border && !o.at_border && p.area > 0 {
                e[DYING] += shrink_evidence(o.area as f64 / p.area as f64, rules);
            }
        }
        e
    };
    let mut score = emit(0);
    if daughter {
        score[DIVIDING] += change;
        score[DYING] += change;
    }
    let mut back: Vec<[usize; STATES]> = Vec::with_capacity(branch.len());
    for k in 1..branch.len() {
        let e = emit(k);
        let mut next = [never; STATES];
        let mut from = [INTERPHASE; STATES];
        for to in 0..STATES {
            for f in 0..STATES {
                let v = score[f] + trans[f][to];
                if v > next[to] {
                    next[to] = v;
                    from[to] = f;
                }
            }
            next[to] += e[to];
        }
        back.push(from);
        score = next;
    }
    let penalty = -rules.end_evidence.max(1.0).ln();
    match end {
        End::Divided => {
            score[INTERPHASE] += penalty;
            score[DYING] += 2.0 * penalty;
        }
        End::Vanished => {
            score[INTERPHASE] += penalty;
            score[DIVIDING] += penalty;
        }
        End::Open => {}
    }
    let mut s = most_probable(&score);
    let mut path = vec![s; branch.len()];
    for k in (1..branch.len()).rev() {
        s = back[k - 1][s];
        path[k - 1] = s;
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: [f32; 3] = [0.7, 0.1, 0.2];

    fn obs(frame: u32, label: u32, p: [f32; 3], area: u64) -> Observation {
        Observation {
            frame,
            label,
            probabilities: p,
            area,
            at_border: false,
        }
    }

    fn rec(label: u32, begin: u32, end: u32, parent: u32) -> TrackRecord {
        TrackRecord {
            label,
            begin,
            end,
            parent,
        }
    }

    #[test]
    fn a_track_that_shrinks_and_vanishes_is_dying_at_its_end() {
        // The head sees interphase (0.6 against 0.3) in every frame; the cell shrinks
        // by a quarter a frame over its last three and is gone before the movie ends.
        let areas = [200, 204, 208, 156, 117, 88];
        let o: Vec<_> = (0..6)
            .map(|t| obs(t, 1, [0.6, 0.1, 0.3], areas[t as usize]))
            .collect();
        let s = decode(&o, &[rec(1, 0, 5, 0)], 9, &StateRules::default());
        let got: Vec<usize> = (0..6).map(|t| s[&(t, 1)]).collect();
        assert_eq!(got, [0, 0, 0, 2, 2, 2]);
        // The same track reaching the movie's end, not shrinking: interphase throughout.
        let flat: Vec<_> = (0..6).map(|t| obs(t, 1, [0.6, 0.1, 0.3], 200)).collect();
        let s = decode(&flat, &[rec(1, 0, 5, 0)], 5, &StateRules::default());
        assert!((0..6).all(|t| s[&(t, 1)] == INTERPHASE), "{s:?}");
    }

    #[test]
    fn a_mother_is_dividing_before_her_daughters_and_they_begin_in_interphase() {
        let mut o: Vec<_> = (0..5).map(|t| obs(t, 1, I, 200)).collect();
        // The head is unsure in the mother's last frame, dividing in the one before.
        o[3].probabilities = [0.3, 0.6, 0.1];
        o[4].probabilities = [0.5, 0.4, 0.1];
        // The daughters look dying to the head (small and dim), but are fresh.
        for l in [2, 3] {
            o.push(obs(5, l, [0.4, 0.1, 0.5], 100));
            o.push(obs(6, l, I, 104));
        }
        let tracks = [rec(1, 0, 4, 0), rec(2, 5, 6, 1), rec(3, 5, 6, 1)];
        let s = decode(&o, &tracks, 6, &StateRules::default());
        assert_eq!(
            (0..5).map(|t| s[&(t, 1)]).collect::<Vec<_>>(),
            [0, 0, 0, 1, 1]
        );
        for l in [2, 3] {
            assert_eq!((s[&(5, l)], s[&(6, l)]), (INTERPHASE, INTERPHASE), "{s:?}");
        }
    }

    #[test]
    fn a_lone_dying_frame_inside_a_living_track_is_interphase() {
        let mut o: Vec<_> = (0..8).map(|t| obs(t, 1, I, 200)).collect();
        o[3].probabilities = [0.35, 0.05, 0.6];
        let s = decode(&o, &[rec(1, 0, 7, 0)], 7, &StateRules::default());
        assert!((0..8).all(|t| s[&(t, 1)] == INTERPHASE), "{s:?}");
        // Without the areas too: dying would have to last to the end of the track.
        let rules = StateRules {
            shrink: 0.0,
            ..StateRules::default()
        };
        let s = decode(&o, &[rec(1, 0, 7, 0)], 7, &rules);
        assert!((0..8).all(|t| s[&(t, 1)] == INTERPHASE), "{s:?}");
    }

    #[test]
    fn a_gap_closed_continuation_is_one_branch_and_unknown_labels_keep_the_head() {
        // Track 1 is continued by track 2 after a gap; the branch vanishes shrinking.
        let mut o = vec![
            obs(0, 1, I, 200),
            obs(1, 1, I, 200),
            obs(3, 2, [0.6, 0.1, 0.3], 200),
            obs(4, 2, [0.6, 0.1, 0.3], 150),
            obs(5, 2, [0.6, 0.1, 0.3], 110),
        ];
        o.push(obs(2, 9, [0.2, 0.7, 0.1], 50));
        let s = decode(
            &o,
            &[rec(1, 0, 1, 0), rec(2, 3, 5, 1)],
            8,
            &StateRules::default(),
        );
        assert_eq!(s[&(0, 1)], INTERPHASE);
        assert_eq!((s[&(4, 2)], s[&(5, 2)]), (DYING, DYING), "{s:?}");
        assert_eq!(s[&(2, 9)], DIVIDING);
        // At the border nothing is known about the end.
        for x in &mut o {
            x.at_border = x.label == 2;
        }
        let s = decode(
            &o,
            &[rec(1, 0, 1, 0), rec(2, 3, 5, 1)],
            8,
            &StateRules::default(),
        );
        assert!((3..6).all(|t| s[&(t, 2)] == INTERPHASE), "{s:?}");
    }
}
