//! Quantized weights for linear layers: int8 (per-output-channel absmax,
//! LLM.int8-style weight-only), llama.cpp's block types (Q8_0, Q4_K, … through
//! candle's `QTensor`), and the load-time policy that says which layers of a
//! model to quantize while it loads, one layer at a time from the
//! memory-mapped dense file (the full dense model is never in memory).
//! Weights stay quantized in memory; each forward dequantizes the one layer it
//! needs into the compute dtype and runs the dense GEMM, so speed stays close
//! to dense while the resident weights shrink 2× (int8, Q8_0 vs bf16) to 4×+.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};

/// A quantization a user can ask for (`[[models]] config = { quantize = ... }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// Per-output-channel absmax int8.
    Int8,
    /// llama.cpp's 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// llama.cpp's 4-bit k-quant (super-blocks of 256).
    Q4K,
}

impl QuantKind {
    /// From a config value; unknown names are an error listing the known ones.
    pub fn parse(text: &str) -> std::result::Result<Option<QuantKind>, String> {
        match text.to_ascii_lowercase().as_str() {
            "" | "none" | "f32" | "dense" => Ok(None),
            "int8" => Ok(Some(QuantKind::Int8)),
            "q8_0" => Ok(Some(QuantKind::Q8_0)),
            "q4_k" => Ok(Some(QuantKind::Q4K)),
            "fp8" => Err(
                "fp8 needs FP8 matrix units (a Hopper-class GPU); this build runs fp8 nowhere: use int8, q8_0 or q4_k"
                    .into(),
            ),
            other => Err(format!(
                "unknown quantization {other:?}: use int8, q8_0, q4_k or none"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Int8 => "int8",
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4K => "q4_k",
        }
    }

    /// Input widths this kind can hold (llama.cpp blocks run along a row).
    fn fits(self, in_dim: usize) -> bool {
        match self {
            QuantKind::Int8 => true,
            QuantKind::Q8_0 => in_dim.is_multiple_of(32),
            QuantKind::Q4K => in_dim.is_multiple_of(256),
        }
    }
}

/// A linear layer's weight held quantized, (out × in) as checkpoints store it.
#[derive(Debug, Clone)]
pub enum QuantizedWeight {
    /// `w[o, i] = (q[o, i] − 128) · scale[o]`: `q` as u8 (out × in), `scale`
    /// (out × 1) in f32.
    Int8 { q: Tensor, scale: Tensor },
    /// A llama.cpp block type.
    Ggml(Arc<QTensor>),
}

impl QuantizedWeight {
    /// Quantize a dense (out × in) weight.
    pub fn quantize(weight: &Tensor, kind: QuantKind) -> Result<Self> {
        match kind {
            QuantKind::Int8 => {
                let w = weight.to_dtype(DType::F32)?;
                let absmax = w.abs()?.max_keepdim(1)?;
                // An all-zero row keeps scale 1 (its codes are all 128).
                let scale = (absmax.clamp(f32::MIN_POSITIVE, f32::MAX)? / 127.0)?;
                let codes = (w.broadcast_div(&scale)?.round()?.clamp(-127f32, 127f32)? + 128.0)?;
                Ok(QuantizedWeight::Int8 {
                    q: codes.to_dtype(DType::U8)?,
                    scale,
                })
            }
            QuantKind::Q8_0 => Self::ggml(weight, GgmlDType::Q8_0),
            QuantKind::Q4K => Self::ggml(weight, GgmlDType::Q4K),
        }
    }

    fn ggml(weight: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let device = weight.device().clone();
        // candle quantizes on the CPU; the blocks then live on `device`.
        let host = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        Ok(QuantizedWeight::Ggml(Arc::new(QTensor::quantize_onto(
            &host, dtype, &device,
        )?)))
    }

    /// The weight as dense (out × in) in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            QuantizedWeight::Int8 { q, scale } => (q.to_dtype(DType::F32)? - 128.0)?
                .broadcast_mul(scale)?
                .to_dtype(dtype),
            QuantizedWeight::Ggml(t) => t.dequantize(&t.device())?.to_dtype(dtype),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            QuantizedWeight::Int8 { q, .. } => q.dims2(),
            QuantizedWeight::Ggml(t) => t.shape().dims2(),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            QuantizedWeight::Int8 { q, scale } => q.elem_count() + 4 * scale.elem_count(),
            QuantizedWeight::Ggml(t) => t.storage_size_in_bytes(),
        }
    }

    /// What kind of quantization this is, for messages.
    pub fn kind_name(&self) -> String {
        match self {
            QuantizedWeight::Int8 { .. } => "int8".into(),
            QuantizedWeight::Ggml(t) => format!("{:?}", t.dtype()),
        }
    }
}

/// Which layers of a model quantize while it loads.
#[derive(Clone, Copy)]
pub struct LoadPolicy {
    pub kind: QuantKind,
    /// Layers (by checkpoint name) that stay dense: norms, embeddings,
    /// modulation, final layers, as bitsandbytes/diffusers keep them.
    pub keep_dense: fn(&str) -> bool,
}

thread_local! {
    static POLICY: RefCell<Option<LoadPolicy>> = const { RefCell::new(None) };
}

/// Run `load` with `policy` applying to the linear layers it loads on this
/// thread (restored afterwards, also on panic).
pub fn while_loading<T>(policy: Option<LoadPolicy>, load: impl FnOnce() -> T) -> T {
    struct Restore(Option<LoadPolicy>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            POLICY.with(|p| *p.borrow_mut() = previous);
        }
    }
    let previous = POLICY.with(|p| p.replace(policy));
    let _restore = Restore(previous);
    load()
}

/// The quantization the current load asks of layer `name` of input width
/// `in_dim`, if any.
pub(crate) fn for_layer(name: &str, in_dim: usize) -> Option<QuantKind> {
    POLICY.with(|p| {
        p.borrow().and_then(|policy| {
            (!(policy.keep_dense)(name) && policy.kind.fits(in_dim)).then_some(policy.kind)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &Tensor, b: &Tensor) -> f32 {
        let dot = (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn each_kind_round_trips_close_to_the_dense_weight() {
        let w = Tensor::randn(0f32, 0.05, (64, 512), &Device::Cpu).unwrap();
        for (kind, bound) in [
            (QuantKind::Int8, 0.9999),
            (QuantKind::Q8_0, 0.9999),
            (QuantKind::Q4K, 0.99),
        ] {
            let q = QuantizedWeight::quantize(&w, kind).unwrap();
            let back = q.dequantize(DType::F32).unwrap();
            assert_eq!(back.dims(), w.dims());
            let c = cosine(&back, &w);
            assert!(c >= bound, "{kind:?}: cosine {c}");
            assert!(
                q.bytes() < 512 * 64 * 4 / 3,
                "{kind:?}: {} bytes",
                q.bytes()
            );
        }
        // int8 is exact where the row's values are multiples of its step.
        let exact =
            Tensor::new(&[[-127f32, 0.0, 63.5 * 2.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&exact, QuantKind::Int8).unwrap();
        let back = q.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back, vec![vec![-127.0, 0.0, 127.0], vec![0.0, 0.0, 0.0]]);
    }

    #[test]
    fn kinds_parse_with_clear_errors() {
        assert_eq!(QuantKind::parse("INT8").unwrap(), Some(QuantKind::Int8));
        assert_eq!(QuantKind::parse("none").unwrap(), None);
        assert!(QuantKind::parse("fp8").unwrap_err().contains("FP8"));
        assert!(
            QuantKind::parse("q3")
                .unwrap_err()
                .contains("int8, q8_0, q4_k")
        );
        assert!(!QuantKind::Q4K.fits(300) && QuantKind::Q8_0.fits(320));
    }
}
