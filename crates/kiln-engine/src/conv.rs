//! 2-D convolution for the VAE/UNet hot path, on CPU in f32 (or with bf16
//! products), with the bias added as the output is written: stride-1
//! convolutions run the direct AVX-512 kernel ([`crate::conv_direct`]) where
//! the CPU has it (bf16 layers with weights packed once at load, f32 ones
//! of 32² and larger images packing per call); everything else goes through
//! im2col or per-tap GEMMs ([`crate::conv_im2col`]). Other devices and
//! dtypes use candle's conv2d.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::conv_direct;
pub use crate::conv_direct::{PackedConv, Products};
use crate::conv_im2col::Im2colConv;
use crate::cpu_op::contiguous_f32;

/// A convolution layer with bias (weights `out × in × k × k`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: ConvWeight,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

#[derive(Debug, Clone)]
enum ConvWeight {
    Dense(Tensor),
    /// Packed for the direct kernel at load (the dense copy is dropped).
    Packed(Arc<PackedConv>),
}

impl Conv2d {
    /// Load `weight` and `bias` under `vb`. A load that puts the model's
    /// linear layers in bf16 gives a stride-1 layer bf16 products: on a CPU
    /// with AVX512-BF16 its weights are packed as bf16 pairs for the direct
    /// kernel (half the memory); elsewhere, and for f32 layers, they stay
    /// dense (f32 packs per call where that pays).
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_channels, "bias")?);
        let wanted = match crate::quant::for_layer(&vb.prefix(), in_channels * kernel * kernel) {
            Some(crate::quant::QuantKind::Bf16) => Products::Bf16,
            _ => Products::F32,
        };
        let layer = Conv2d::from_parts(weight, bias, stride, padding);
        layer.packed_for(wanted)
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Conv2d {
            weight: ConvWeight::Dense(weight),
            bias,
            stride,
            padding,
        }
    }

    /// The layer with its weights packed for the direct kernel with
    /// `products`; as it is where the kernel does not apply (other strides,
    /// devices or dtypes, CPUs without the kernel's features) and for f32
    /// products, which pack per call (im2col is faster for small images).
    pub fn packed_for(self, products: Products) -> Result<Self> {
        let ConvWeight::Dense(weight) = &self.weight else {
            return Ok(self);
        };
        let f32_on_cpu = weight.device().is_cpu() && weight.dtype() == DType::F32;
        if products == Products::F32
            || self.stride != 1
            || !f32_on_cpu
            || !conv_direct::available(products)
        {
            return Ok(self);
        }
        let packed = PackedConv::pack(weight, products)?;
        crate::resident::record(packed.bytes() as i64 - crate::resident::tensor_bytes(weight));
        Ok(Conv2d {
            weight: ConvWeight::Packed(Arc::new(packed)),
            ..self
        })
    }

    /// The dtype the layer's weights compute in.
    pub fn dtype(&self) -> DType {
        match &self.weight {
            ConvWeight::Dense(weight) => weight.dtype(),
            ConvWeight::Packed(_) => DType::F32,
        }
    }

    /// How the layer multiplies on this CPU.
    pub fn products(&self) -> Products {
        match &self.weight {
            ConvWeight::Dense(_) => Products::F32,
            ConvWeight::Packed(packed) => packed.products(),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f32_on_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let bias_f32 = self.bias.as_ref().is_none_or(f32_on_cpu);
        let weight = match &self.weight {
            ConvWeight::Packed(packed) if f32_on_cpu(x) && bias_f32 => {
                return conv2d_packed(x, packed, self.bias.as_ref(), self.padding);
            }
            ConvWeight::Packed(packed) => &packed.dense()?.to_device(x.device())?,
            ConvWeight::Dense(weight) => weight,
        };
        if f32_on_cpu(x) && f32_on_cpu(weight) && bias_f32 {
            return conv2d_im2col(x, weight, self.bias.as_ref(), self.stride, self.padding);
        }
        let y = x.conv2d(
            &weight.to_dtype(x.dtype())?,
            self.padding,
            self.stride,
            1,
            1,
        )?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `x (N, C, H, W) ⊛ w (O, C, kh, kw) + bias` on CPU in f32: through the
/// direct kernel (weights packed per call) for stride-1 convolutions on
/// AVX-512 CPUs, else im2col or per-tap GEMMs.
pub fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    conv2d_cpu(x, w, bias, (stride, padding), Products::F32)
}

/// [`conv2d_im2col`] with `products`: bf16 runs stride-1 convolutions
/// through the direct AVX512-BF16 kernel where the CPU has it (and is f32
/// elsewhere).
pub fn conv2d_cpu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (stride, padding): (usize, usize),
    products: Products,
) -> Result<Tensor> {
    let g = Geometry::new(x.dims4()?, w.dims4()?, stride, padding)?;
    // Packing costs a pass over the weights (memory-bound: about what a few
    // hundred output positions of compute take); bf16 layers pack once at
    // load, and bf16 asked of a CPU without AVX512-BF16 is f32.
    let products = match products {
        Products::Bf16 if conv_direct::available(Products::Bf16) => Some(Products::Bf16),
        _ if conv_direct::available(Products::F32) && conv_direct::pays_per_call(g) => {
            Some(Products::F32)
        }
        _ => None,
    };
    if let (1, Some(products)) = (stride, products) {
        let packed = PackedConv::pack(w, products)?;
        return conv2d_packed(x, &packed, bias, padding);
    }
    let op = Im2colConv {
        geometry: g,
        bias: bias_values(bias, g.o)?,
    };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// `x ⊛ packed + bias`, stride 1, on CPU in f32 through the direct kernel
/// (whose features the CPU must have for `packed`'s products).
pub fn conv2d_packed(
    x: &Tensor,
    packed: &PackedConv,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    if !conv_direct::available(packed.products()) {
        candle_core::bail!("conv2d: this CPU lacks the direct kernel's features");
    }
    let g = Geometry::new(x.dims4()?, packed.dims(), 1, padding)?;
    let op = DirectConv {
        geometry: g,
        bias: bias_values(bias, g.o)?,
        packed,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

fn bias_values(bias: Option<&Tensor>, o: usize) -> Result<Option<Vec<f32>>> {
    let Some(bias) = bias else {
        return Ok(None);
    };
    let values = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if values.len() != o {
        candle_core::bail!("conv2d: bias length does not match {o} output channels");
    }
    Ok(Some(values))
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (o, c2, kh, kw): (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if c != c2 {
            candle_core::bail!("conv2d: input has {c} channels, weight expects {c2}");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 || n == 0 {
            candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a padded {h}×{w} input");
        }
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            out_h: (h + 2 * padding - kh) / stride + 1,
            out_w: (w + 2 * padding - kw) / stride + 1,
            stride,
            padding,
        })
    }

    pub fn output_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.out_h, self.out_w))
    }

    /// The output holding the bias (one pass; zeroing first would be a second).
    pub fn output_with_bias(&self, bias: Option<&[f32]>) -> Vec<f32> {
        let plane = self.out_h * self.out_w;
        match bias {
            Some(bias) => {
                let mut out = Vec::with_capacity(self.n * self.o * plane);
                for _ in 0..self.n {
                    for &b in bias {
                        out.extend(std::iter::repeat_n(b, plane));
                    }
                }
                out
            }
            None => vec![0f32; self.n * self.o * plane],
        }
    }
}

/// `x ⊛ packed + bias` through the direct kernel.
struct DirectConv<'a> {
    geometry: Geometry,
    bias: Option<Vec<f32>>,
    packed: &'a PackedConv,
}

impl CustomOp1 for DirectConv<'_> {
    fn name(&self) -> &'static str {
        "kiln-conv2d-direct"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let input = contiguous_f32(storage, layout, self.name())?;
        let mut out = crate::memory::zeroed(g.n * g.o * g.out_h * g.out_w);
        conv_direct::convolve(g, self.packed, input, self.bias.as_deref(), &mut out);
        Ok((CpuStorage::F32(out), g.output_shape()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// candle's convolution plus the bias: what every CPU path is checked against.
    pub(crate) fn candle_reference(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: usize,
    ) -> Tensor {
        x.conv2d(weight, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::parity::compare(a, b).unwrap().max_abs
    }

    #[test]
    fn im2col_matches_candle_for_strides_paddings_and_kernels() {
        let device = Device::Cpu;
        for (c, o, h, w, k, stride, padding) in [
            (3, 8, 17, 13, 3, 1, 1),
            (16, 24, 20, 9, 3, 1, 0),
            (6, 5, 12, 10, 5, 1, 2),
            (4, 5, 6, 7, 1, 1, 1),
            (8, 4, 64, 80, 3, 1, 1),
            (4, 6, 16, 16, 3, 2, 0),
            (5, 7, 9, 11, 1, 1, 0),
            (2, 3, 8, 8, 3, 2, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (o, c, k, k), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, o, &device).unwrap();
            let ours = conv2d_im2col(&x, &weight, Some(&bias), stride, padding).unwrap();
            let theirs = candle_reference(&x, &weight, &bias, stride, padding);
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) < 1e-4,
                "c{c} o{o} {h}x{w} k{k} s{stride} p{padding}"
            );
        }
    }
}

#[cfg(test)]
mod load_tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::VarBuilder;

    use super::{Conv2d, Products};
    use crate::quant::{LoadPolicy, QuantKind, while_loading};

    /// A bf16 load policy gives stride-1 layers bf16 products (packed, where
    /// the CPU has AVX512-BF16) and leaves layers it keeps dense, strided
    /// layers and loads without a policy in f32; every layer still computes
    /// its convolution.
    #[test]
    fn bf16_load_policy_reaches_convolutions() {
        let device = Device::Cpu;
        let mut tensors = HashMap::new();
        for name in ["packed", "kept", "strided"] {
            let weight = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &device).unwrap();
            tensors.insert(format!("{name}.weight"), weight);
            tensors.insert(
                format!("{name}.bias"),
                Tensor::zeros(6, DType::F32, &device).unwrap(),
            );
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let policy = LoadPolicy {
            kind: QuantKind::Bf16,
            keep_dense: |name| name == "kept",
        };
        let load = |name: &str, stride| Conv2d::load(&vb.pp(name), 4, 6, 3, stride, 1).unwrap();
        let (packed, kept, strided) = while_loading(Some(policy), || {
            (load("packed", 1), load("kept", 1), load("strided", 2))
        });
        let bf16 = if crate::conv_direct::available(Products::Bf16) {
            Products::Bf16
        } else {
            Products::F32
        };
        assert_eq!(packed.products(), bf16);
        assert_eq!(kept.products(), Products::F32);
        assert_eq!(strided.products(), Products::F32);
        assert_eq!(load("packed", 1).products(), Products::F32);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 9, 9), &device).unwrap();
        let exact = load("packed", 1).forward(&x).unwrap();
        let rounded = packed.forward(&x).unwrap();
        let diff = crate::parity::compare(&rounded, &exact).unwrap();
        assert!(diff.cosine_distance < 1e-4, "{diff:?}");
        assert_eq!(strided.forward(&x).unwrap().dims(), &[1, 6, 5, 5]);
    }
}
