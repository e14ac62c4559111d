//! 2-D convolution for the VAE/UNet hot path, on CPU in f32, accumulating into
//! an output that starts as the bias: a 1×1 convolution is one GEMM on the
//! image itself; a stride-1 convolution of a 64² or larger image is one GEMM
//! per kernel tap over one padded channels-last copy ([`crate::conv_nhwc`]);
//! smaller images and other strides go through im2col over chunks of output
//! rows, each chunk one GEMM (the `gemm` crate candle itself uses) written in
//! place. Other devices and dtypes use candle's conv2d.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::conv_nhwc::{self, Stride1};
use crate::cpu_gemm::gemm_accumulate_on;
use crate::cpu_op::contiguous_f32;

/// Input planes (h · w) from which stride-1 convolutions skip im2col: below
/// 64², the UNet's 8²–32² layers at 256², the per-tap GEMMs are too small
/// (SDXL's mid UNet step measured 15–20% slower through them on Zen 4).
const SHIFTED_GEMM_MIN_PLANE: usize = 64 * 64;
/// Output positions per GEMM: bounds the im2col buffer at `K × CHUNK` floats.
const CHUNK: usize = 8192;
/// Multiply-adds (o · pixels · k) below which a batch of images is split one
/// image per thread rather than one GEMM across threads (a 32-channel 64×64
/// layer is ~3.5M; an SDXL VAE layer at 512² is ~10⁹).
const SMALL_IMAGE_WORK: usize = 1 << 26;

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
        let f32_on_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
        if f32_on_cpu(x) && f32_on_cpu(&self.weight) && self.bias.as_ref().is_none_or(f32_on_cpu) {
            return conv2d_im2col(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
            );
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
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

/// `x (N, C, H, W) ⊛ w (O, C, kh, kw) + bias` on CPU in f32: im2col over chunks
/// of whole output rows, each chunk one GEMM written straight into its columns
/// of the output (which starts as the bias); a 1×1 stride-1 convolution is one
/// GEMM on the input itself.
pub fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 {
        candle_core::bail!("conv2d: input has {c} channels, weight expects {c2}");
    }
    if h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a padded {h}×{wd} input");
    }
    let out_h = (h + 2 * padding - kh) / stride + 1;
    let out_w = (wd + 2 * padding - kw) / stride + 1;
    let bias = match bias {
        Some(bias) => Some(bias.to_vec1::<f32>()?),
        None => None,
    };
    if bias.as_ref().is_some_and(|b| b.len() != o) {
        candle_core::bail!("conv2d: bias length does not match {o} output channels");
    }
    let op = Im2colConv {
        geometry: Geometry {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            out_h,
            out_w,
            stride,
            padding,
        },
        bias,
    };
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    out_h: usize,
    out_w: usize,
    stride: usize,
    padding: usize,
}

struct Im2colConv {
    geometry: Geometry,
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for Im2colConv {
    fn name(&self) -> &'static str {
        "kiln-conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let input = contiguous_f32(input, input_layout, self.name())?;
        let weights = contiguous_f32(weight, weight_layout, self.name())?;
        let plane = g.out_h * g.out_w;
        let k = g.c * g.kh * g.kw;
        // The output starts as the bias (one pass; zeroing first would be a second).
        let mut out = match &self.bias {
            Some(bias) => {
                let mut out = Vec::with_capacity(g.n * g.o * plane);
                for _ in 0..g.n {
                    for &b in bias {
                        out.extend(std::iter::repeat_n(b, plane));
                    }
                }
                out
            }
            None => vec![0f32; g.n * g.o * plane],
        };
        let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
        if g.stride == 1 && !pointwise && g.h * g.w >= SHIFTED_GEMM_MIN_PLANE {
            let shape = Stride1 {
                n: g.n,
                c: g.c,
                h: g.h,
                w: g.w,
                o: g.o,
                kh: g.kh,
                kw: g.kw,
                padding: g.padding,
            };
            conv_nhwc::convolve(shape, input, weights, &mut out);
            return Ok((
                CpuStorage::F32(out),
                Shape::from((g.n, g.o, g.out_h, g.out_w)),
            ));
        }
        let rows_per_chunk = (CHUNK / g.out_w).max(1).min(g.out_h);
        let threads = rayon::current_num_threads();
        // Small images in a batch (a classifier's convolutions) go one image per
        // thread, each GEMM on its own thread: splitting one small GEMM across
        // threads costs more in synchronisation than it saves.
        let per_image_work = g.o * plane * k;
        let by_image = g.n >= threads && threads > 1 && per_image_work < SMALL_IMAGE_WORK;
        let image_len = g.c * g.h * g.w;
        let convolve =
            |image: &[f32], out: &mut [f32], cols: &mut Vec<f32>, gemm_threads: usize| {
                if pointwise {
                    gemm_accumulate_on(
                        out,
                        plane,
                        weights,
                        image,
                        plane,
                        (g.o, plane, k),
                        gemm_threads,
                    );
                    return;
                }
                cols.resize(k * rows_per_chunk * g.out_w, 0.0);
                let mut first_row = 0;
                while first_row < g.out_h {
                    let rows = rows_per_chunk.min(g.out_h - first_row);
                    let m = rows * g.out_w;
                    let cols = &mut cols[..k * m];
                    let fill = |(k_row, column): (usize, &mut [f32])| {
                        fill_columns(
                            column,
                            image,
                            (g.h, g.w),
                            (g.kh, g.kw),
                            (g.out_w, g.stride, g.padding),
                            k_row..k_row + 1,
                            first_row,
                            rows,
                        )
                    };
                    if gemm_threads > 1 {
                        cols.par_chunks_mut(m).enumerate().for_each(fill);
                    } else {
                        cols.chunks_mut(m).enumerate().for_each(fill);
                    }
                    let dst = &mut out[first_row * g.out_w..];
                    gemm_accumulate_on(dst, plane, weights, cols, m, (g.o, m, k), gemm_threads);
                    first_row += rows;
                }
            };
        if by_image {
            out.par_chunks_mut(g.o * plane)
                .zip(input.par_chunks(image_len))
                .for_each_init(Vec::new, |cols, (out, image)| convolve(image, out, cols, 1));
        } else {
            let mut cols = Vec::new();
            for (image, out) in input.chunks(image_len).zip(out.chunks_mut(g.o * plane)) {
                convolve(image, out, &mut cols, threads);
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.n, g.o, g.out_h, g.out_w)),
        ))
    }
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
            let theirs = x
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(
                max_diff(&ours, &theirs) < 1e-4,
                "c{c} o{o} {h}x{w} k{k} s{stride} p{padding}"
            );
        }
    }
}
