//! Stride-1 convolution without im2col: the image is copied once, padded and
//! channels-last, so for each kernel tap (ky, kx) the input channels of every
//! output position are `c` consecutive floats at a fixed offset from the
//! position's own: the product is one GEMM per tap (`k = c`) that reads the
//! padded image and the weights (a strided column of the `o × c·kh·kw`
//! matrix) in place. im2col wrote and re-read `kh · kw` copies of the image
//! per convolution (a 37 MB column buffer for a 128-channel 128² layer); this
//! writes one, and never copies the weights. A batch is one tall image (the
//! images' padding rows keep them apart), so small images still make GEMMs
//! large enough to split across threads, by columns and by output channels.
//! The output is computed on the padded width (each row's last `kw − 1`
//! positions are discarded) in column blocks sized for L2, one block per
//! task, and written into the output with the bias added, without them.

use rayon::prelude::*;

use crate::conv::Geometry;
use crate::cpu_op::DisjointOut;

/// Output floats per task block (256 KiB): a block of output channels stays
/// in a core's L2 cache across its `kh · kw` GEMMs.
const BLOCK_FLOATS: usize = 1 << 16;

/// Channels copied together into the channels-last image.
const CHANNEL_TILE: usize = 8;

/// Output channels per task are a multiple of this (the GEMM kernel's rows).
const CHANNEL_QUANTUM: usize = 16;

/// Most output channels per task block.
const MAX_CHANNELS: usize = 128;

/// `out (n × o × out_h × out_w) = images (n × c × h × w) ⊛ weights (o × c × kh × kw) + bias`,
/// stride 1, zero padding `padding`, on rayon's threads.
pub(crate) fn convolve(
    g: Geometry,
    images: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let (out_h, out_w) = (hp + 1 - g.kh, wp + 1 - g.kw);
    assert!(images.len() >= g.n * g.c * g.h * g.w && weights.len() >= g.o * g.c * g.kh * g.kw);
    assert!(out.len() >= g.n * g.o * out_h * out_w && out_h > 0 && out_w > 0 && g.n > 0);
    assert_eq!(g.stride, 1, "shifted-GEMM convolution: stride 1 only");
    let padded = pad_channels_last(g, images);
    // Output position p = y · wp + x over the tall image of n · hp rows; the
    // last image's last row needs only out_w positions.
    let positions = ((g.n - 1) * hp + out_h - 1) * wp + out_w;
    let mut wide = vec![0f32; g.o * positions];
    // Blocks of at most MAX_CHANNELS output channels by enough columns to
    // fill BLOCK_FLOATS: the weights' strided tap columns are packed once per
    // block, so blocks stay wide; then narrower until every thread has work.
    let mut channels = g.o.min(MAX_CHANNELS);
    let mut columns = (BLOCK_FLOATS / channels).clamp(256, 4096).min(positions);
    let wanted = 4 * rayon::current_num_threads();
    let count =
        |channels: usize, columns: usize| g.o.div_ceil(channels) * positions.div_ceil(columns);
    while count(channels, columns) < wanted && columns > 128 {
        columns = columns.div_ceil(2);
    }
    while count(channels, columns) < wanted && channels > CHANNEL_QUANTUM {
        channels = (channels / 2).next_multiple_of(CHANNEL_QUANTUM);
    }
    let column_blocks = positions.div_ceil(columns);
    let channel_blocks = g.o.div_ceil(channels);
    let taps = g.kh * g.kw;
    let wide_ptr = DisjointOut::new(&mut wide);
    let task = |index: usize| {
        let (channel_block, column_block) = (index / column_blocks, index % column_blocks);
        let (first_o, first) = (channel_block * channels, column_block * columns);
        let (m, n) = (channels.min(g.o - first_o), columns.min(positions - first));
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let tap = ky * g.kw + kx;
                // SAFETY: the largest padded-image index read is
                // ((kh − 1) · wp + kw − 1 + positions − 1) · c + c − 1 = n · hp · wp · c − 1,
                // inside `padded`; the weights' tap column reaches
                // (o − 1) · c · taps + (c − 1) · taps + tap < o · c · taps; this
                // task writes rows first_o..first_o + m, columns first..first + n
                // of `wide`, which no other task touches.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        g.c,
                        wide_ptr.get().add(first_o * positions + first),
                        1,
                        positions as isize,
                        tap > 0,
                        weights[first_o * g.c * taps + tap..].as_ptr(),
                        taps as isize,
                        (g.c * taps) as isize,
                        padded[((ky * wp + kx) + first) * g.c..].as_ptr(),
                        g.c as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        }
    };
    (0..channel_blocks * column_blocks)
        .into_par_iter()
        .for_each(task);
    compact_with_bias(g, (hp, wp, positions), &wide, bias, out);
}

/// The images as one tall `(n · (h + 2p)) × (w + 2p) × c` image, zeros around each.
fn pad_channels_last(g: Geometry, images: &[f32]) -> Vec<f32> {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let mut padded = vec![0f32; g.n * hp * wp * g.c];
    let plane = g.h * g.w;
    let fill_row = |(tall_y, row): (usize, &mut [f32])| {
        let (b, y) = (tall_y / hp, tall_y % hp);
        let Some(iy) = y.checked_sub(g.padding).filter(|&iy| iy < g.h) else {
            return;
        };
        let image = &images[b * g.c * plane..(b + 1) * g.c * plane];
        // Eight channels at a time: the channel planes are a power-of-two
        // apart, so reading more rows at once would evict each other from L1.
        let row = &mut row[g.padding * g.c..(g.padding + g.w) * g.c];
        for first in (0..g.c).step_by(CHANNEL_TILE) {
            let channels = CHANNEL_TILE.min(g.c - first);
            let sources: [&[f32]; CHANNEL_TILE] = std::array::from_fn(|i| {
                let ci = (first + i).min(g.c - 1);
                &image[ci * plane + iy * g.w..ci * plane + (iy + 1) * g.w]
            });
            for (x, pixel) in row.chunks_exact_mut(g.c).enumerate() {
                for (i, d) in pixel[first..first + channels].iter_mut().enumerate() {
                    *d = sources[i][x];
                }
            }
        }
    };
    padded
        .par_chunks_mut(wp * g.c)
        .enumerate()
        .for_each(fill_row);
    padded
}

/// Write each image's valid wide rows, without their trailing positions,
/// plus the channel's bias, into the output (`positions` is the wide rows'
/// stride): one vectorised pass, rather than a bias fill and an add.
pub(crate) fn compact_with_bias(
    g: Geometry,
    (hp, wp, positions): (usize, usize, usize),
    wide: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (out_h, out_w) = (hp + 1 - g.kh, wp + 1 - g.kw);
    let plane = out_h * out_w;
    let channel = |(index, dst): (usize, &mut [f32])| {
        let (b, oi) = (index / g.o, index % g.o);
        let src = &wide[oi * positions + b * hp * wp..];
        let channel_bias = bias.map_or(0.0, |bias| bias[oi]);
        for (y, row) in dst.chunks_mut(out_w).enumerate() {
            add_bias_row(&src[y * wp..y * wp + out_w], channel_bias, row);
        }
    };
    out[..g.n * g.o * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(channel);
}

#[inline(always)]
fn add_bias_row_body(src: &[f32], bias: f32, dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s + bias;
    }
}

crate::simd_dispatch!(fn add_bias_row(src: &[f32], bias: f32, dst: &mut [f32]) => add_bias_row_body);
