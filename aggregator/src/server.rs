//! Server steps: how the aggregate update moves the model.
//!
//! [`ServerOptimizer::Sgd`] adds the aggregate (plain FedAvg and the robust merges). The
//! adaptive optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021,
//! Algorithm 2) treat the aggregate `g` as a pseudo-gradient and keep per-parameter
//! moments `m` and `v` between rounds:
//!
//! ```text
//! m = beta1 * m + (1 - beta1) * g
//! FedAdagrad:  v = v + g^2
//! FedYogi:     v = v - (1 - beta2) * g^2 * sign(v - g^2)
//! FedAdam:     v = beta2 * v + (1 - beta2) * g^2
//! x = x + eta * m / (sqrt(v) + tau)
//! ```
//!
//! with `m = 0` and `v = tau^2` before the first round. All arithmetic is f32 with IEEE
//! operations only (`sqrt` is correctly rounded), so every member computes the same bits.

use crate::error::AggregateError;

/// Which adaptive rule updates the second moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adaptive {
    /// FedAdam.
    Adam,
    /// FedYogi.
    Yogi,
    /// FedAdagrad.
    Adagrad,
}

impl Adaptive {
    fn tag(self) -> u8 {
        match self {
            Self::Adam => 1,
            Self::Yogi => 2,
            Self::Adagrad => 3,
        }
    }

    /// The strategy name in config files.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Adam => "fedadam",
            Self::Yogi => "fedyogi",
            Self::Adagrad => "fedadagrad",
        }
    }
}

/// Hyper-parameters of an adaptive server optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveParams {
    /// Server learning rate eta.
    pub lr: f32,
    /// First-moment decay beta1.
    pub beta1: f32,
    /// Second-moment decay beta2 (unused by Adagrad).
    pub beta2: f32,
    /// Adaptivity tau.
    pub tau: f32,
}

impl AdaptiveParams {
    /// Checks ranges: `lr > 0`, `0 <= beta1, beta2 < 1`, `tau > 0`, all finite.
    ///
    /// # Errors
    /// [`AggregateError::InvalidConfig`].
    pub fn validate(&self) -> Result<(), AggregateError> {
        let ok = self.lr.is_finite()
            && self.lr > 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.tau.is_finite()
            && self.tau > 0.0;
        if ok {
            Ok(())
        } else {
            Err(AggregateError::InvalidConfig(format!(
                "server optimiser needs lr > 0, beta1 and beta2 in [0, 1) and tau > 0; got {self:?}"
            )))
        }
    }
}

/// The server step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// `x = x + g`.
    Sgd,
    /// An adaptive optimiser with its parameters.
    Adaptive(Adaptive, AdaptiveParams),
}

impl ServerOptimizer {
    /// Whether the step keeps moments between rounds.
    #[must_use]
    pub fn has_state(&self) -> bool {
        matches!(self, Self::Adaptive(..))
    }

    pub(crate) fn tag(&self) -> u8 {
        match self {
            Self::Sgd => 0,
            Self::Adaptive(a, _) => a.tag(),
        }
    }

    /// Initial moments for `p` parameters: `m = 0`, `v = tau^2`.
    #[must_use]
    pub fn initial_moments(&self, p: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        match self {
            Self::Sgd => None,
            Self::Adaptive(_, params) => Some((vec![0.0; p], vec![params.tau * params.tau; p])),
        }
    }
}

/// `out` holds the aggregate `g` on entry and `base + g` on return.
pub(crate) fn sgd_chunk(base: &[f32], out: &mut [f32]) {
    crate::kernels::add_onto(Some(base), out);
}

/// Moments of one chunk: read from `m0`/`v0`, written to `m1`/`v1`.
pub(crate) struct MomentChunk<'a> {
    pub(crate) m0: &'a [f32],
    pub(crate) v0: &'a [f32],
    pub(crate) m1: &'a mut [f32],
    pub(crate) v1: &'a mut [f32],
}

/// `out` holds the pseudo-gradient `g` on entry and the new weights on return.
pub(crate) fn adaptive_chunk(
    kind: Adaptive,
    p: &AdaptiveParams,
    base: &[f32],
    out: &mut [f32],
    s: MomentChunk<'_>,
) {
    let (b1, b2) = (p.beta1, p.beta2);
    for i in 0..out.len() {
        let g = out[i];
        let g2 = g * g;
        let m = b1 * s.m0[i] + (1.0 - b1) * g;
        let v0 = s.v0[i];
        let v = match kind {
            Adaptive::Adam => b2 * v0 + (1.0 - b2) * g2,
            Adaptive::Adagrad => v0 + g2,
            Adaptive::Yogi => {
                let sign = if v0 > g2 {
                    1.0
                } else if v0 < g2 {
                    -1.0
                } else {
                    0.0
                };
                v0 - (1.0 - b2) * g2 * sign
            }
        };
        s.m1[i] = m;
        s.v1[i] = v;
        out[i] = base[i] + p.lr * m / (v.sqrt() + p.tau);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> AdaptiveParams {
        AdaptiveParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    fn step(kind: Adaptive, g: f32, m0: f32, v0: f32) -> (f32, f32, f32) {
        let (mut m1, mut v1, mut out) = ([0f32], [0f32], [g]);
        adaptive_chunk(
            kind,
            &params(),
            &[1.0],
            &mut out,
            MomentChunk {
                m0: &[m0],
                v0: &[v0],
                m1: &mut m1,
                v1: &mut v1,
            },
        );
        (out[0], m1[0], v1[0])
    }

    #[test]
    fn adaptive_rules_match_reddi_et_al() {
        let p = params();
        let (b1, b2, tau2) = (p.beta1, p.beta2, p.tau * p.tau);
        let g = 0.5f32;
        let (x, m, v) = step(Adaptive::Adam, g, 0.0, tau2);
        assert_eq!(m, b1 * 0.0 + (1.0 - b1) * g);
        assert_eq!(v, b2 * tau2 + (1.0 - b2) * g * g);
        assert_eq!(x, 1.0 + p.lr * m / (v.sqrt() + p.tau));
        let (_, _, v) = step(Adaptive::Adagrad, g, 0.0, tau2);
        assert_eq!(v, tau2 + g * g);
        // Yogi: v moves towards g^2 additively, in the direction of sign(g^2 - v).
        let (_, _, v) = step(Adaptive::Yogi, g, 0.0, tau2);
        assert_eq!(v, tau2 + (1.0 - b2) * g * g);
        let (_, _, v) = step(Adaptive::Yogi, g, 0.0, 1.0);
        assert_eq!(v, 1.0 - (1.0 - b2) * g * g);
        assert!(v < 1.0);
    }

    #[test]
    fn parameters_are_validated() {
        assert!(params().validate().is_ok());
        for bad in [
            AdaptiveParams {
                lr: 0.0,
                ..params()
            },
            AdaptiveParams {
                beta1: 1.0,
                ..params()
            },
            AdaptiveParams {
                beta2: -0.1,
                ..params()
            },
            AdaptiveParams {
                tau: f32::NAN,
                ..params()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
