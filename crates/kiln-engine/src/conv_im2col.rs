//! The im2col convolution on CPU in f32: patches of chunks of whole output
//! rows copied into a column buffer, each chunk one GEMM (the `gemm` crate
//! candle itself uses) written straight into its columns of the output; a
//! 1×1 stride-1 convolution is one GEMM on the image itself, and a stride-1
//! convolution of a 64² or larger image one GEMM per kernel tap over a padded
//! channels-last copy ([`crate::conv_nhwc`]). CPUs with AVX-512 run their
//! stride-1 convolutions through [`crate::conv_direct`] instead.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use crate::conv::Geometry;
use crate::conv_nhwc;
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

/// `input ⊛ weight + bias` through im2col (or per-tap GEMMs).
pub(crate) struct Im2colConv {
    pub geometry: Geometry,
    pub bias: Option<Vec<f32>>,
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
        let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
        if g.stride == 1 && !pointwise && g.h * g.w >= SHIFTED_GEMM_MIN_PLANE {
            let mut out = vec![0f32; g.n * g.o * plane];
            conv_nhwc::convolve(g, input, weights, self.bias.as_deref(), &mut out);
            return Ok((CpuStorage::F32(out), g.output_shape()));
        }
        let mut out = g.output_with_bias(self.bias.as_deref());
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
        Ok((CpuStorage::F32(out), g.output_shape()))
    }
}
