//! LoRA adapters at inference. Runtime mode: a request's adapters are made
//! active on the thread that runs it ([`with_adapters`]); every named
//! [`Linear`](crate::nn::Linear) adds `scale · (x Aᵀ) Bᵀ` for the adapters aimed
//! at it, leaving base weights untouched, so concurrent requests with different
//! LoRAs each get their own result. Fused mode merges `scale · B A` into a
//! layer's weight and restores the stored original exactly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

/// One low-rank update of one layer, prepared for the forward pass.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// Aᵀ: in × rank.
    down_t: Tensor,
    /// (scale · B)ᵀ: rank × out.
    up_t: Tensor,
    /// Both factors on the accelerator the model runs on, copied there on
    /// first use (adapters are built on the CPU from the file) and reused by
    /// every later step.
    on_device: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

impl LowRank {
    /// From A (rank × in) and B (out × rank) as files store them, with the
    /// combined scale (alpha / rank × the user's scale).
    pub fn new(down: &Tensor, up: &Tensor, scale: f64, dtype: DType) -> Result<Self> {
        let (rank, _) = down.dims2()?;
        let (_, up_rank) = up.dims2()?;
        if rank != up_rank {
            candle_core::bail!("LoRA ranks differ: A has {rank} rows, B has {up_rank} columns");
        }
        Ok(LowRank {
            down_t: down.to_dtype(dtype)?.t()?.contiguous()?,
            up_t: (up.to_dtype(DType::F32)? * scale)?
                .to_dtype(dtype)?
                .t()?
                .contiguous()?,
            on_device: Arc::default(),
        })
    }

    /// (Aᵀ, (scale · B)ᵀ) on `device`.
    fn factors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        if self.down_t.device().same_device(device) {
            return Ok((self.down_t.clone(), self.up_t.clone()));
        }
        let mut cached = self
            .on_device
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA device copy poisoned".into()))?;
        if let Some((down, up)) = cached.as_ref()
            && down.device().same_device(device)
        {
            return Ok((down.clone(), up.clone()));
        }
        let copy = (self.down_t.to_device(device)?, self.up_t.to_device(device)?);
        *cached = Some(copy.clone());
        Ok(copy)
    }

    pub fn in_dim(&self) -> usize {
        self.down_t.dims()[0]
    }

    pub fn out_dim(&self) -> usize {
        self.up_t.dims()[1]
    }

    /// `scale · (x Aᵀ) Bᵀ` for rows `x` (n × in).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (down_t, up_t) = self.factors(x.device())?;
        x.matmul(&down_t)?.matmul(&up_t)
    }

    /// The full update `scale · B A` as (out × in), on `device`.
    pub fn delta(&self, device: &Device) -> Result<Tensor> {
        let (down_t, up_t) = self.factors(device)?;
        down_t.matmul(&up_t)?.t()
    }
}

/// Adapters for one request, keyed by the target layer's name.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    layers: HashMap<String, Vec<LowRank>>,
}

impl AdapterSet {
    pub fn add(&mut self, layer: impl Into<String>, update: LowRank) {
        self.layers.entry(layer.into()).or_default().push(update);
    }

    /// Add every update of `other` (several LoRAs on one request).
    pub fn extend(&mut self, other: AdapterSet) {
        for (layer, updates) in other.layers {
            self.layers.entry(layer).or_default().extend(updates);
        }
    }

    /// Fused mode: merge every update aimed at `linear` into its weight.
    /// Returns whether any was.
    pub fn merge_into(&self, linear: &mut crate::nn::Linear) -> Result<bool> {
        let Some(updates) = linear.name().and_then(|name| self.layers.get(name)) else {
            return Ok(false);
        };
        let updates = updates.clone();
        for update in &updates {
            linear.merge(update)?;
        }
        Ok(true)
    }

    pub fn get(&self, layer: &str) -> Option<&[LowRank]> {
        self.layers.get(layer).map(Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// How many layers have at least one adapter.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.layers.keys().map(String::as_str)
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<AdapterSet>>> = const { RefCell::new(None) };
}

/// Run `f` with `adapters` active on this thread (restored afterwards, also on
/// panic).
pub fn with_adapters<T>(adapters: Option<Arc<AdapterSet>>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<AdapterSet>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            ACTIVE.with(|active| *active.borrow_mut() = previous);
        }
    }
    let previous = ACTIVE.with(|active| active.replace(adapters));
    let _restore = Restore(previous);
    f()
}

/// The adapters active on this thread for `layer`, applied to rows `x`.
pub(crate) fn apply_active(layer: &str, x: &Tensor, y: Tensor) -> Result<Tensor> {
    ACTIVE.with(|active| {
        let active = active.borrow();
        let Some(updates) = active.as_ref().and_then(|set| set.get(layer)) else {
            return Ok(y);
        };
        let mut y = y;
        for update in updates {
            let delta = update.apply(x).map_err(|e| {
                candle_core::Error::Msg(format!("LoRA update for layer {layer} does not fit: {e}"))
            })?;
            y = (y + delta)?;
        }
        Ok(y)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use candle_core::{Device, Module};
    use candle_nn::VarBuilder;

    fn named_linear() -> Linear {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (6, 4), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 6, &device).unwrap();
        let tensors = HashMap::from([
            ("block.proj.weight".to_string(), weight),
            ("block.proj.bias".to_string(), bias),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        Linear::load(&vb.pp("block").pp("proj"), 4, 6, true).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn runtime_adapters_equal_merged_weights_and_unmerge_is_exact() {
        let device = Device::Cpu;
        let mut linear = named_linear();
        assert_eq!(linear.name(), Some("block.proj"));
        let down = Tensor::randn(0f32, 1.0, (2, 4), &device).unwrap();
        let up = Tensor::randn(0f32, 1.0, (6, 2), &device).unwrap();
        let update = LowRank::new(&down, &up, 0.75, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 4), &device).unwrap();
        let base = linear.forward(&x).unwrap();

        let mut set = AdapterSet::default();
        set.add("block.proj", update.clone());
        set.add("elsewhere", update.clone());
        let runtime = with_adapters(Some(Arc::new(set)), || linear.forward(&x).unwrap());
        // Outside the scope the base layer is untouched.
        assert_eq!(max_diff(&linear.forward(&x).unwrap(), &base), 0.0);

        let expected_delta = (up.matmul(&down).unwrap() * 0.75).unwrap();
        let by_hand = (x.reshape((3, 4)).unwrap())
            .matmul(&expected_delta.t().unwrap())
            .unwrap()
            .reshape((1, 3, 6))
            .unwrap();
        assert!(max_diff(&runtime, &(&base + &by_hand).unwrap()) < 1e-5);

        linear.merge(&update).unwrap();
        let fused = linear.forward(&x).unwrap();
        assert!(max_diff(&fused, &runtime) < 1e-5);
        linear.unmerge();
        assert_eq!(max_diff(&linear.forward(&x).unwrap(), &base), 0.0);

        let wrong = LowRank::new(
            &down,
            &Tensor::zeros((5, 2), DType::F32, &device).unwrap(),
            1.0,
            DType::F32,
        )
        .unwrap();
        assert!(linear.merge(&wrong).is_err());
    }

    #[test]
    fn adapters_are_restored_after_a_panic() {
        let set = Arc::new(AdapterSet::default());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_adapters(Some(set), || panic!("boom"));
        }));
        assert!(caught.is_err());
        ACTIVE.with(|active| assert!(active.borrow().is_none()));
    }
}
