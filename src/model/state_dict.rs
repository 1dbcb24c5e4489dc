//! State-dict export/import of the [`Encoder`]: its parameters, BatchNorm running
//! statistics and `num_batches_tracked` counter as named tensors (torchvision
//! `state_dict` names and shapes), and the checks that loading one makes.
use super::{Encoder, Storage};
use crate::backend::Backend;
use crate::error::{Error, Result};

/// One state-dict tensor: (torchvision name, shape, values).
pub type StateEntry = (String, Vec<usize>, Vec<f32>);

impl<B: Backend> Encoder<B> {
    /// Every state-dict tensor as (torchvision name, shape, values), in torchvision order.
    /// `num_batches_tracked` entries carry the counter as one f32 value.
    pub fn state_dict(&self) -> Result<Vec<StateEntry>> {
        let p = self.backend.download_f32(&self.params)?;
        let r = self.backend.download_f32(&self.running)?;
        Ok(self
            .table
            .entries()
            .iter()
            .map(|e| {
                let v = match e.storage {
                    Storage::Param => p[e.offset..e.offset + e.len].to_vec(),
                    Storage::RunningMean | Storage::RunningVar => {
                        r[e.offset..e.offset + e.len].to_vec()
                    }
                    Storage::NumBatchesTracked => vec![self.num_batches_tracked as f32],
                };
                (e.name.clone(), e.shape.clone(), v)
            })
            .collect())
    }

    /// Loads one tensor by torchvision name (parameters or running statistics; a
    /// `num_batches_tracked` entry sets the counter). Errors on an unknown name or a shape
    /// mismatch, changing nothing.
    pub fn load_tensor(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let e = self.table.get(name).ok_or_else(|| {
            Error::invalid(format!("unknown tensor {name:?} for {}", self.cfg.arch))
        })?;
        if e.shape != shape || values.len() != e.len {
            return Err(Error::invalid(format!(
                "{name}: shape {shape:?} ({} values) does not match the model's {:?}",
                values.len(),
                e.shape
            )));
        }
        let (storage, offset) = (e.storage, e.offset);
        match storage {
            Storage::Param => self.backend.write_f32(&mut self.params, offset, values),
            Storage::RunningMean | Storage::RunningVar => {
                self.backend.write_f32(&mut self.running, offset, values)
            }
            Storage::NumBatchesTracked => {
                self.num_batches_tracked = values[0].max(0.0) as u64;
                Ok(())
            }
        }
    }
}
