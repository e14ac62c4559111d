//! 2-D convolution for the VAE/UNet hot path: on CPU in f32, im2col over chunks
//! of output rows feeding one large GEMM per chunk (candle's own conv2d is ~3×
//! slower than PyTorch's here); other devices and dtypes use candle's conv2d.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Output positions per GEMM: bounds the im2col buffer at `K × CHUNK` floats.
const CHUNK: usize = 8192;

/// A convolution layer with bias (weights `out × in × k × k`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: vb.get((out_channels, in_channels, kernel, kernel), "weight")?,
            bias: Some(vb.get(out_channels, "bias")?),
            stride,
            padding,
        })
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Conv2d {
            weight,
            bias,
            stride,
            padding,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            conv2d_im2col(x, &self.weight, self.stride, self.padding)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Fill `cols` (row-major `K × m`, `m = rows × out_w`) with the patches of output
/// rows `first_row..first_row + rows`; `k_rows` are the patch rows this thread owns.
#[allow(clippy::too_many_arguments)]
fn fill_columns(
    cols: &mut [f32],
    image: &[f32],
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    (out_w, stride, padding): (usize, usize, usize),
    k_rows: std::ops::Range<usize>,
    first_row: usize,
    rows: usize,
) {
    let m = rows * out_w;
    for (local, k_row) in k_rows.enumerate() {
        let channel = k_row / (kh * kw);
        let ky = (k_row / kw) % kh;
        let kx = k_row % kw;
        let plane = &image[channel * h * w..(channel + 1) * h * w];
        let out = &mut cols[local * m..(local + 1) * m];
        // Output columns whose input column is inside the image: ox in [lo, hi).
        let lo = padding.saturating_sub(kx).div_ceil(stride).min(out_w);
        let hi = ((w + padding).saturating_sub(kx))
            .div_ceil(stride)
            .min(out_w)
            .max(lo);
        for r in 0..rows {
            let segment = &mut out[r * out_w..(r + 1) * out_w];
            let iy = ((first_row + r) * stride + ky) as isize - padding as isize;
            if iy < 0 || iy as usize >= h {
                segment.fill(0.0);
                continue;
            }
            let line = &plane[iy as usize * w..(iy as usize + 1) * w];
            segment[..lo].fill(0.0);
            segment[hi..].fill(0.0);
            let ix0 = lo * stride + kx - padding;
            if stride == 1 {
                segment[lo..hi].copy_from_slice(&line[ix0..ix0 + (hi - lo)]);
            } else {
                for (j, slot) in segment[lo..hi].iter_mut().enumerate() {
                    *slot = line[ix0 + j * stride];
                }
            }
        }
    }
}

/// `x (N, C, H, W) ⊛ w (O, C, kh, kw)` without bias, as im2col + GEMM over chunks
/// of whole output rows.
pub fn conv2d_im2col(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 {
        candle_core::bail!("conv2d: input has {c} channels, weight expects {c2}");
    }
    let out_h = (h + 2 * padding - kh) / stride + 1;
    let out_w = (wd + 2 * padding - kw) / stride + 1;
    let k = c * kh * kw;
    let weights = w.reshape((o, k))?;
    let input = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(8);
    let rows_per_chunk = (CHUNK / out_w).max(1);
    let mut outputs = Vec::with_capacity(n);
    for b in 0..n {
        let image = &input[b * c * h * wd..(b + 1) * c * h * wd];
        let mut parts = Vec::with_capacity(out_h.div_ceil(rows_per_chunk));
        let mut first_row = 0;
        while first_row < out_h {
            let rows = rows_per_chunk.min(out_h - first_row);
            let m = rows * out_w;
            let mut cols = vec![0f32; k * m];
            let per_thread = k.div_ceil(threads);
            std::thread::scope(|scope| {
                for (t, chunk) in cols.chunks_mut(per_thread * m).enumerate() {
                    let k_rows = t * per_thread..(t * per_thread + chunk.len() / m);
                    scope.spawn(move || {
                        fill_columns(
                            chunk,
                            image,
                            (h, wd),
                            (kh, kw),
                            (out_w, stride, padding),
                            k_rows,
                            first_row,
                            rows,
                        )
                    });
                }
            });
            let cols = Tensor::from_vec(cols, (k, m), x.device())?;
            parts.push(weights.matmul(&cols)?);
            first_row += rows;
        }
        outputs.push(Tensor::cat(&parts, 1)?.reshape((o, out_h, out_w))?);
    }
    Tensor::stack(&outputs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::parity::compare(a, b).unwrap().max_abs
    }

    #[test]
    fn im2col_matches_candle_for_strides_paddings_and_kernels() {
        let device = Device::Cpu;
        for (c, o, h, w, k, stride, padding) in [
            (3, 8, 17, 13, 3, 1, 1),
            (4, 6, 16, 16, 3, 2, 0),
            (5, 7, 9, 11, 1, 1, 0),
            (2, 3, 8, 8, 3, 2, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (o, c, k, k), &device).unwrap();
            let ours = conv2d_im2col(&x, &weight, stride, padding).unwrap();
            let theirs = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) < 1e-4,
                "c{c} o{o} {h}x{w} k{k} s{stride} p{padding}"
            );
        }
    }
}
