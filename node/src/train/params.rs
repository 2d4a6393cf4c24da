//! The model's parameters as [`Weights`], by name, in canonical order.
//!
//! This module is the only code that reads or writes raw parameter tensors. Names are
//! burn's dotted module paths (`"down.0.c1.weight"`); [`Weights`] sorts them, so the
//! layout (and the model hash) does not depend on declaration order.

use burn::store::ModuleSnapshot;
use burn::store::bridge;
use burn::tensor::{DType, TensorData};
use cellswarm_common::weights::{Weights, WeightsError};

use crate::model::UNet;

/// What went wrong converting between a model and [`Weights`].
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// A parameter is not f32.
    #[error("parameter {name:?} has dtype {dtype:?}; only f32 parameters are supported")]
    DType {
        /// The parameter.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// A parameter's bytes could not be read.
    #[error("parameter {name:?}: {message}")]
    Read {
        /// The parameter.
        name: String,
        /// What failed.
        message: String,
    },
    /// The weights do not fit the model.
    #[error("the weights do not fit this model: {0}")]
    Mismatch(String),
    /// The weights are invalid.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// The model's parameters.
///
/// # Errors
/// A non-f32 parameter, or values that are not finite.
pub fn to_weights(model: &UNet) -> Result<Weights, ParamsError> {
    let mut tensors = Vec::new();
    for t in model.collect(None, None, false) {
        if t.dtype != DType::F32 {
            return Err(ParamsError::DType {
                name: t.name.clone(),
                dtype: t.dtype,
            });
        }
        let shape = t.shape.to_vec();
        let name = t.name.clone();
        let data = bridge::into_data(t).map_err(|e| ParamsError::Read {
            name: name.clone(),
            message: e.to_string(),
        })?;
        let values = data.try_into_vec::<f32>().map_err(|e| ParamsError::Read {
            name: name.clone(),
            message: format!("{e:?}"),
        })?;
        tensors.push((name, shape, values));
    }
    Ok(Weights::from_tensors(tensors)?)
}

/// Replaces the model's parameters with `weights` (names and shapes must match exactly;
/// parameter ids are kept, so optimiser state stays attached).
///
/// # Errors
/// [`ParamsError::Mismatch`] naming the first missing, extra or misshapen tensor.
pub fn load_weights(model: &mut UNet, weights: &Weights) -> Result<(), ParamsError> {
    let current = model.collect(None, None, false);
    if current.len() != weights.layout().entries().len() {
        return Err(ParamsError::Mismatch(format!(
            "the model has {} tensors, the weights {}",
            current.len(),
            weights.layout().entries().len()
        )));
    }
    let mut tensors = Vec::with_capacity(current.len());
    for t in current {
        let entry = weights.layout().find(&t.name).ok_or_else(|| {
            ParamsError::Mismatch(format!("no tensor named {:?} in the weights", t.name))
        })?;
        let shape = t.shape.to_vec();
        if entry.shape() != shape.as_slice() {
            return Err(ParamsError::Mismatch(format!(
                "tensor {:?} has shape {:?} in the weights, {:?} in the model",
                t.name,
                entry.shape(),
                shape
            )));
        }
        let values = weights.values()[entry.range()].to_vec();
        tensors.push(bridge::from_data(
            TensorData::new(values, shape),
            t.name.clone(),
            t.param_id,
        ));
    }
    let result = model.apply(tensors, None, None, false);
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(ParamsError::Mismatch(format!(
            "applying the weights: errors {:?}, missing {:?}, unused {:?}",
            result.errors, result.missing, result.unused
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{UNetConfig, default_device};

    #[test]
    fn weights_round_trip_bit_exactly() {
        let device = default_device();
        device.seed(1);
        let cfg = UNetConfig::new().with_depth(2).with_base_channels(4);
        let a = cfg.init(&device);
        let wa = to_weights(&a).unwrap();
        assert!(
            wa.layout()
                .entries()
                .windows(2)
                .all(|p| p[0].name() < p[1].name())
        );
        assert!(wa.layout().find("down.0.c1.weight").is_some());
        let mut b = cfg.init(&device);
        assert_ne!(
            to_weights(&b).unwrap().hash(),
            wa.hash(),
            "fresh init differs"
        );
        load_weights(&mut b, &wa).unwrap();
        let wb = to_weights(&b).unwrap();
        assert_eq!(wb.hash(), wa.hash());
        let bits = |w: &Weights| w.values().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wb), bits(&wa));
    }

    #[test]
    fn mismatched_weights_are_refused() {
        let device = default_device();
        let small = to_weights(
            &UNetConfig::new()
                .with_depth(2)
                .with_base_channels(4)
                .init(&device),
        )
        .unwrap();
        let mut wider = UNetConfig::new()
            .with_depth(2)
            .with_base_channels(8)
            .init(&device);
        let err = load_weights(&mut wider, &small).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
        let mut deeper = UNetConfig::new()
            .with_depth(3)
            .with_base_channels(4)
            .init(&device);
        assert!(load_weights(&mut deeper, &small).is_err());
    }
}
