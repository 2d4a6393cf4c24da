//! Training frames read a few at a time, so that a movie larger than memory trains in
//! bounded memory.
//!
//! [`open_training`] looks at one frame of each movie (its size, and its cells' width for
//! the training scale) and estimates what holding every annotated frame would take. Within
//! the budget (`--max-resident-mb`, `[data] max_resident_mb`; [`DEFAULT_RESIDENT_MB`]) the
//! frames are read at once, as they always were ([`TrainingFrames::Resident`]). Above it
//! they are streamed ([`PlaneStream`]): the patch sampler holds as many frames as the
//! budget allows and, every [`ROTATE_EVERY`] batches, replaces the one it has held longest
//! with the next frame of a seeded random order of all of them (a new order each pass). A
//! thread reads the next frame while the network trains; the swap waits for it, so which
//! frames a batch can draw from depends on the step alone and a seed still gives the same
//! run.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::DataError;
use super::dataset::{Annotated, AnnotatedMovie, frame_planes, movie_widths, train_planes};
use super::patches::{PlaneSet, TrainPlane};
use crate::scale;

/// Memory budget for training frames when none is set, in MiB.
pub const DEFAULT_RESIDENT_MB: u64 = 4096;

/// Batches between two frame swaps of a streamed movie.
pub const ROTATE_EVERY: u64 = 2;

/// Bytes a pixel of an annotated frame takes while it is read (f32 intensities, u32
/// labels, a state byte) and as a training plane (f32 intensities, class and state bytes,
/// f32 distance target).
const READ_BYTES: u64 = 9;
const PLANE_BYTES: u64 = 10;

/// How training holds its frames.
#[derive(Debug)]
pub enum TrainingFrames {
    /// Every annotated frame, read.
    Resident(Vec<Annotated>),
    /// Too many for the budget: read while training.
    Streamed(PlaneStream),
}

impl TrainingFrames {
    /// The training planes: every frame's, rescaled to the training width `diameter`
    /// ([`super::dataset::train_planes`]), or the stream.
    #[must_use]
    pub fn into_planes(self, diameter: Option<u32>) -> PlaneSet {
        match self {
            Self::Resident(frames) => PlaneSet::Resident(train_planes(&frames, diameter)),
            Self::Streamed(s) => PlaneSet::Streamed(s),
        }
    }
}

/// The annotated frames of several movies, read a few at a time while training.
#[derive(Debug, Clone)]
pub struct PlaneStream {
    movies: Arc<Vec<AnnotatedMovie>>,
    /// Each movie's factor from its annotated cell width to the training width.
    factors: Vec<f32>,
    /// Each movie's annotated cell width, by name.
    widths: BTreeMap<String, f32>,
    /// (movie, frame) of every frame.
    frames: Vec<(usize, u32)>,
    /// Frames held at once.
    resident: usize,
    /// Whether planes carry the distance head's target.
    distance: bool,
}

impl PlaneStream {
    /// Frames in all.
    #[must_use]
    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    /// Frames held at once.
    #[must_use]
    pub fn resident(&self) -> usize {
        self.resident
    }

    /// Each movie's annotated cell width (pixels), estimated on one of its frames.
    #[must_use]
    pub fn widths(&self) -> &BTreeMap<String, f32> {
        &self.widths
    }

    /// The same stream with planes carrying the distance head's target or not.
    #[must_use]
    pub fn with_distance(mut self, distance: bool) -> Self {
        self.distance = distance;
        self
    }

    /// The training planes of frame `i` (one per z-plane).
    fn planes(&self, i: usize) -> Result<Vec<TrainPlane>, DataError> {
        let (m, t) = self.frames[i];
        let Some(a) = self.movies[m].load(t)? else {
            return Ok(Vec::new());
        };
        let planes = frame_planes(&a, self.factors[m]);
        Ok(if self.distance {
            planes.into_iter().map(TrainPlane::with_distance).collect()
        } else {
            planes
        })
    }

    /// The order of pass `pass` over all frames.
    fn order(&self, seed: u64, pass: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.frames.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        order
    }

    /// Starts streaming with seed `seed`: reads the first frames, then keeps one read
    /// ahead on a thread.
    ///
    /// # Errors
    /// A first frame that cannot be read, or none with a mask.
    pub fn start(self, seed: u64) -> Result<(Vec<TrainPlane>, Streamer), DataError> {
        let order = self.order(seed, 0);
        let mut planes = Vec::new();
        let mut groups = VecDeque::new();
        let mut next = 0;
        while groups.len() < self.resident && next < order.len() {
            let p = self.planes(order[next])?;
            next += 1;
            if !p.is_empty() {
                groups.push_back(p.len());
                planes.extend(p);
            }
        }
        if planes.is_empty() {
            return Err(DataError::NoMasks {
                path: self.movies[0].name().into(),
                problem: "no frame of the stream has a mask".into(),
            });
        }
        let (want, requests) = channel::<usize>();
        let (done, ready) = channel();
        let source = self.clone();
        let worker = std::thread::Builder::new()
            .name("cellswarm-frames".into())
            .spawn(move || {
                for i in requests {
                    if done.send((i, source.planes(i))).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DataError::Io {
                path: self.movies[0].name().into(),
                source: e,
            })?;
        let mut s = Streamer {
            stream: self,
            seed,
            order,
            next,
            pass: 0,
            groups,
            want: Some(want),
            ready,
            waiting: false,
            batches: 0,
            swaps: 0,
            failed: 0,
            worker: Some(worker),
        };
        s.ask();
        Ok((planes, s))
    }
}

/// The running side of a [`PlaneStream`]: which frames the sampler holds, and the one
/// being read.
pub struct Streamer {
    stream: PlaneStream,
    seed: u64,
    order: Vec<usize>,
    next: usize,
    pass: u64,
    /// Planes per held frame, oldest first (the sampler's planes in the same order).
    groups: VecDeque<usize>,
    want: Option<Sender<usize>>,
    ready: Receiver<(usize, Result<Vec<TrainPlane>, DataError>)>,
    waiting: bool,
    batches: u64,
    swaps: u64,
    failed: u64,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("frames", &self.stream.frames())
            .field("resident", &self.groups.len())
            .field("pass", &self.pass)
            .field("swaps", &self.swaps)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // Closing the request channel ends the reading thread after its current frame.
        self.want = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Streamer {
    /// Asks the reading thread for the next frame of the order.
    fn ask(&mut self) {
        if self.next >= self.order.len() {
            self.pass += 1;
            self.order = self.stream.order(self.seed, self.pass);
            self.next = 0;
        }
        let i = self.order[self.next];
        self.next += 1;
        self.waiting = self.want.as_ref().is_some_and(|w| w.send(i).is_ok());
    }

    /// Called before each batch: every [`ROTATE_EVERY`] batches the frame held longest
    /// in `planes` is replaced with the one read ahead (waiting for it if need be).
    pub fn before_batch(&mut self, planes: &mut Vec<TrainPlane>) {
        self.batches += 1;
        if !self.batches.is_multiple_of(ROTATE_EVERY) || !self.waiting {
            return;
        }
        self.waiting = false;
        match self.ready.recv() {
            Ok((_, Ok(p))) if !p.is_empty() => {
                if self.groups.len() >= self.stream.resident {
                    let old = self.groups.pop_front().unwrap_or(0);
                    planes.drain(..old.min(planes.len()));
                }
                self.groups.push_back(p.len());
                planes.extend(p);
                self.swaps += 1;
            }
            Ok((_, Ok(_))) => {}
            Ok((i, Err(e))) => {
                self.failed += 1;
                let (m, t) = self.stream.frames[i];
                tracing::warn!(movie = self.stream.movies[m].name(), frame = t, error = %e, "a training frame could not be read; training goes on with the frames held");
            }
            Err(_) => {
                tracing::error!(
                    "the frame-reading thread stopped; training goes on with the frames held"
                );
                return;
            }
        }
        self.ask();
    }

    /// Frames swapped in so far.
    #[must_use]
    pub fn swaps(&self) -> u64 {
        self.swaps
    }
}

/// Decides how training holds the annotated frames of `movies` with training width
/// `diameter` (pixels, or the movies' own scale) in at most `budget_mb` MiB: reads them
/// all when they fit, else streams them.
///
/// # Errors
/// A frame that cannot be read, or [`DataError::NoMasks`] when no movie has one.
pub fn open_training(
    movies: Vec<AnnotatedMovie>,
    diameter: Option<u32>,
    budget_mb: u64,
) -> Result<TrainingFrames, DataError> {
    let movies: Vec<AnnotatedMovie> = movies
        .into_iter()
        .filter(|m| !m.frames().is_empty())
        .collect();
    // One frame of each movie (its middle one): sizes and cell widths.
    let mut probes = Vec::new();
    for m in &movies {
        let frames = m.frames();
        let mut probe = None;
        for &t in frames[frames.len() / 2..]
            .iter()
            .chain(&frames[..frames.len() / 2])
        {
            if let Some(a) = m.load(t)? {
                probe = Some(a);
                break;
            }
        }
        probes.push(probe);
    }
    let mut widths = BTreeMap::new();
    for a in probes.iter().flatten() {
        widths.extend(movie_widths(std::slice::from_ref(a)));
    }
    let factors: Vec<f32> = movies
        .iter()
        .map(|m| match (diameter, widths.get(m.name())) {
            (Some(d), Some(&w)) => scale::factor(d as f32, w, crate::infer::WIDTH_TOLERANCE),
            _ => 1.0,
        })
        .collect();
    let mut total: u64 = 0;
    let mut largest: u64 = 0;
    for ((m, probe), &s) in movies.iter().zip(&probes).zip(&factors) {
        let Some(a) = probe else { continue };
        let (d, h, w) = a.labels.shape();
        let s = scale::capped(s, h, w);
        let (nh, nw) = scale::scaled_size(h, w, s);
        let read = (d * h * w) as u64 * READ_BYTES;
        let plane = (d * nh * nw) as u64 * PLANE_BYTES;
        total = total.saturating_add((read + plane).saturating_mul(m.frames().len() as u64));
        largest = largest.max(plane);
    }
    let budget = budget_mb.saturating_mul(1 << 20);
    let count: usize = movies.iter().map(|m| m.frames().len()).sum();
    // At least two frames are held (one to draw from while the next is read).
    let resident = usize::try_from(budget / largest.max(1))
        .unwrap_or(usize::MAX)
        .max(2);
    if total <= budget || largest == 0 || resident >= count {
        // Every frame, the probes read above among them (not read again).
        let mut all = Vec::with_capacity(count);
        for (m, mut probe) in movies.iter().zip(probes) {
            for &t in m.frames() {
                match probe.take_if(|p| p.t == t) {
                    Some(a) => all.push(a),
                    None => all.extend(m.load(t)?),
                }
            }
        }
        return Ok(TrainingFrames::Resident(all));
    }
    let frames: Vec<(usize, u32)> = movies
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.frames().iter().map(move |&t| (i, t)))
        .collect();
    tracing::info!(
        frames = count,
        resident,
        estimate_mb = total >> 20,
        budget_mb,
        "the training frames exceed the memory budget: streaming them"
    );
    Ok(TrainingFrames::Streamed(PlaneStream {
        movies: Arc::new(movies),
        factors,
        widths,
        frames,
        resident,
        distance: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ctc::Movie;
    use crate::data::dataset::load_annotated;
    use crate::data::patches::{PatchSampler, SamplerConfig};
    use crate::synth::{Profile, generate};

    /// A 6-frame synthetic movie of 64 x 64, listed.
    fn movie(dir: &std::path::Path) -> (Movie, AnnotatedMovie) {
        let p = Profile {
            size: 64,
            ..Profile::named("balanced").unwrap()
        };
        generate(&p, 6, 3).write_ctc(dir, "01").unwrap();
        let m = Movie::open(&dir.join("01")).unwrap();
        let listed = AnnotatedMovie::open(&m, None).unwrap();
        (m, listed)
    }

    fn streamed(listed: AnnotatedMovie) -> PlaneStream {
        match open_training(vec![listed], None, 0).unwrap() {
            TrainingFrames::Streamed(s) => s,
            TrainingFrames::Resident(_) => panic!("a zero budget streams"),
        }
    }

    #[test]
    fn frames_within_the_budget_are_read_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (m, listed) = movie(dir.path());
        let all = load_annotated(&m, None).unwrap();
        match open_training(vec![listed.clone()], None, DEFAULT_RESIDENT_MB).unwrap() {
            TrainingFrames::Resident(frames) => {
                assert_eq!(frames.len(), all.len());
                assert!(frames.iter().zip(&all).all(|(a, b)| a.t == b.t
                    && a.image.data == b.image.data
                    && a.labels.data == b.labels.data));
            }
            TrainingFrames::Streamed(_) => panic!("six small frames fit in 4 GiB"),
        }
        // Held-out frames are left out of what is read.
        let held = listed.clone().without(Some("0-1".parse().unwrap()));
        assert_eq!(held.frames().len(), all.len() - 2);
        // Two frames are the fewest a stream holds: two are read at once, whatever the
        // budget.
        let two = listed.without(Some("2-5".parse().unwrap()));
        assert!(matches!(
            open_training(vec![two], None, 0).unwrap(),
            TrainingFrames::Resident(f) if f.len() == 2
        ));
    }

    #[test]
    fn a_streamed_movie_rotates_through_every_frame_reproducibly() {
        let dir = tempfile::tempdir().unwrap();
        let (_, listed) = movie(dir.path());
        let s = streamed(listed);
        assert_eq!((s.frames(), s.resident()), (6, 2));
        let config = SamplerConfig::plain(32);
        let draw = |seed: u64| {
            let mut sampler = PatchSampler::streamed(s.clone(), config, seed).unwrap();
            assert_eq!(sampler.planes().len(), 2);
            let mut images = Vec::new();
            let mut held = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let b = sampler.batch(2);
                // A plane is known by its first row of intensities.
                for p in sampler.planes() {
                    held.insert(
                        p.image[..p.width]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                    );
                }
                assert!(sampler.planes().len() <= 2);
                images.extend(b.images);
            }
            (images, held.len(), sampler.swaps())
        };
        let (a, seen, swaps) = draw(7);
        assert_eq!(
            swaps, 20,
            "one frame swapped in every {ROTATE_EVERY} batches"
        );
        assert_eq!(seen, 6, "every frame was held at some point");
        let (b, _, _) = draw(7);
        assert_eq!(a, b, "the same seed draws the same patches");
        let (c, _, _) = draw(8);
        assert_ne!(a, c);
    }

    #[test]
    fn a_frame_that_cannot_be_read_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (_, listed) = movie(dir.path());
        let s = streamed(listed);
        let mut sampler = PatchSampler::streamed(s, SamplerConfig::plain(32), 1).unwrap();
        // Every frame file goes after the first two are held: each swap fails to read.
        for e in std::fs::read_dir(dir.path().join("01")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        for _ in 0..12 {
            let b = sampler.batch(2);
            assert_eq!(b.images.len(), 2 * 32 * 32);
        }
        assert_eq!(sampler.planes().len(), 2, "the frames held stay");
    }
}
