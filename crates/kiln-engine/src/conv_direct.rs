//! Direct convolution on AVX-512 CPUs, with f32 products or with bf16
//! products through AVX512-BF16's `vdpbf16ps`: no im2col and no per-tap GEMM
//! repacking. The batch is copied once into zero-padded planes (one per input
//! channel in f32; one per channel pair in bf16, each word holding the pair's
//! two bf16 values) laid end to end as one tall image, so for every kernel
//! tap the inputs of 48 consecutive output positions are 48 consecutive words
//! at a fixed offset. The weights are reordered per call (they are a small
//! fraction of the work) into tiles of 8 output channels, one run of 8 values
//! per (input, tap). The microkernel keeps an 8-channel × 48-position tile of
//! sums in 24 registers and, per (input, tap), loads three vectors of the
//! image and broadcasts the 8 weights: the output comes out channel-major, as
//! NCHW wants it. Outputs are computed on the padded width (each row's last
//! `kw − 1` positions are discarded as the bias is added).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::conv::Geometry;
use crate::conv_nhwc::compact_with_bias;
use crate::cpu_op::DisjointOut;

/// How a convolution multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// f32 products and sums.
    #[default]
    F32,
    /// Inputs and weights rounded to bf16 (nearest even), sums in f32, as
    /// oneDNN's bf16 convolutions run on CPUs with AVX512-BF16.
    Bf16,
}

/// Output channels per microkernel tile.
const TILE_CHANNELS: usize = 8;
/// Output positions per microkernel tile (three 16-lane registers).
const TILE_POSITIONS: usize = 48;
/// Input planes per cache block: a tile's image rows and its weights for
/// the block stay in L1/L2 across the block's tiles.
const BLOCK_INPUTS: usize = 64;
/// Most output channels per task.
const MAX_TASK_CHANNELS: usize = 64;
/// Most output positions per task.
const MAX_TASK_POSITIONS: usize = 8 * TILE_POSITIONS;

/// Whether this CPU runs the direct kernel for `products`.
pub(crate) fn available(products: Products) -> bool {
    match products {
        Products::F32 => crate::simd::level() >= crate::simd::Level::Avx512,
        Products::Bf16 => crate::bf16_gemm::has_avx512_bf16(),
    }
}

/// A convolution's weights in the direct kernel's layout, for one kind of
/// products: tiles of 8 output channels; tile t, input plane i, tap k, lane l
/// at `((t · inputs + i) · taps + k) · 8 + l`, zero past the last channel
/// (and, in bf16, in the high half of an odd channel count's last pair).
/// Layers pack once at load; [`crate::conv::conv2d_cpu`] packs per call.
#[derive(Debug, Clone)]
pub struct PackedConv {
    /// (out, in, kh, kw).
    dims: (usize, usize, usize, usize),
    words: Words,
}

#[derive(Debug, Clone)]
enum Words {
    F32(Vec<f32>),
    Bf16(Vec<u32>),
}

impl PackedConv {
    /// Pack an (out × in × kh × kw) weight for `products`.
    pub fn pack(weight: &Tensor, products: Products) -> Result<Self> {
        let dims = weight.dims4()?;
        let dense = weight
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self::from_slice(&dense, dims, products))
    }

    pub(crate) fn from_slice(
        weights: &[f32],
        dims: (usize, usize, usize, usize),
        products: Products,
    ) -> Self {
        let words = match products {
            Products::F32 => Words::F32(pack_words(weights, dims, 1, |w| w[0])),
            Products::Bf16 => Words::Bf16(pack_words(weights, dims, 2, |w| {
                bf16_bits(w[0]) | (bf16_bits(w[1]) << 16)
            })),
        };
        PackedConv { dims, words }
    }

    /// (out, in, kh, kw).
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.dims
    }

    pub fn products(&self) -> Products {
        match self.words {
            Words::F32(_) => Products::F32,
            Words::Bf16(_) => Products::Bf16,
        }
    }

    /// Bytes held (padding to whole tiles included).
    pub fn bytes(&self) -> usize {
        match &self.words {
            Words::F32(words) => 4 * words.len(),
            Words::Bf16(words) => 4 * words.len(),
        }
    }

    /// The weight as an f32 (out × in × kh × kw) tensor again (bf16-rounded
    /// for bf16 products), for the paths the direct kernel does not take.
    pub fn dense(&self) -> Result<Tensor> {
        let (o, c, kh, kw) = self.dims;
        let taps = kh * kw;
        let per_input = self.per_input();
        let inputs = c.div_ceil(per_input);
        let mut dense = vec![0f32; o * c * taps];
        for (index, value) in dense.iter_mut().enumerate() {
            let (oi, ci, tap) = (index / (c * taps), (index / taps) % c, index % taps);
            let word = ((oi / TILE_CHANNELS * inputs + ci / per_input) * taps + tap)
                * TILE_CHANNELS
                + oi % TILE_CHANNELS;
            *value = match &self.words {
                Words::F32(words) => words[word],
                Words::Bf16(words) => {
                    f32::from_bits(((words[word] >> (16 * (ci % 2))) & 0xffff) << 16)
                }
            };
        }
        Tensor::from_vec(dense, self.dims, &Device::Cpu)
    }

    fn per_input(&self) -> usize {
        match self.words {
            Words::F32(_) => 1,
            Words::Bf16(_) => 2,
        }
    }
}

/// The tile layout of [`PackedConv`]: `convert` makes one word from the
/// `per_input` weights of a plane (missing channels as 0).
fn pack_words<E: Copy + Default + Send + Sync>(
    weights: &[f32],
    (o, c, kh, kw): (usize, usize, usize, usize),
    per_input: usize,
    convert: impl Fn([f32; 2]) -> E + Sync,
) -> Vec<E> {
    let taps = kh * kw;
    let inputs = c.div_ceil(per_input);
    let tile_len = inputs * taps * TILE_CHANNELS;
    let mut packed = vec![E::default(); o.div_ceil(TILE_CHANNELS) * tile_len];
    packed
        .par_chunks_mut(tile_len)
        .enumerate()
        .for_each(|(tile, packed)| {
            for lane in 0..TILE_CHANNELS.min(o - tile * TILE_CHANNELS) {
                let filter = &weights[(tile * TILE_CHANNELS + lane) * c * taps..];
                for input in 0..inputs {
                    for tap in 0..taps {
                        let weight = |j: usize| {
                            let ci = input * per_input + j;
                            if j < per_input && ci < c {
                                filter[ci * taps + tap]
                            } else {
                                0.0
                            }
                        };
                        packed[(input * taps + tap) * TILE_CHANNELS + lane] =
                            convert([weight(0), weight(1)]);
                    }
                }
            }
        });
    packed
}

/// `out (n × o × out_h × out_w) = images (n × c × h × w) ⊛ weights + bias`,
/// stride 1, zero padding, on rayon's threads. The caller checks
/// [`available`] for the weights' products first.
pub(crate) fn convolve(
    g: Geometry,
    weights: &PackedConv,
    images: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        available(weights.products()),
        "direct convolution: CPU lacks the kernel's features"
    );
    assert_eq!(
        weights.dims,
        (g.o, g.c, g.kh, g.kw),
        "direct convolution: weight shape"
    );
    assert_eq!(g.stride, 1, "direct convolution: stride 1 only");
    assert!(images.len() >= g.n * g.c * g.h * g.w);
    let layout = Layout::new(g, weights.per_input());
    let mut wide = crate::memory::zeroed(layout.channels * layout.stride);
    match &weights.words {
        Words::F32(packed) => {
            let planes = layout.planes(g, images, |src, dst| dst.copy_from_slice(src[0]));
            layout.run(&planes, packed, &mut wide, tile_f32);
        }
        Words::Bf16(packed) => {
            let planes = layout.planes(g, images, |src, dst| {
                // SAFETY: `available` checked AVX512-BF16.
                unsafe { pair_row(src[0], src[1], dst) }
            });
            layout.run(&planes, packed, &mut wide, tile_bf16);
        }
    }
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    compact_with_bias(g, (hp, wp, layout.stride), &wide, bias, out);
}

/// Whether f32 products should take the direct kernel with the weights
/// packed on this call: the output must be large enough to amortise the pass
/// over the weights, and the tall layout's padding must waste little (8²
/// images compute 50% more positions than they have, 16² 22%, 32² 10%;
/// below 32², im2col's GEMM is faster on Zen 4).
pub(crate) fn pays_per_call(g: Geometry) -> bool {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let (out_h, out_w) = (hp + 1 - g.kh, wp + 1 - g.kw);
    let valid = g.n * out_h * out_w;
    let layout = Layout::new(g, 1);
    valid >= 1024 && layout.stride * 100 <= valid * 115
}

/// Where everything lies for one convolution.
struct Layout {
    /// Input planes: channels (f32) or channel pairs (bf16).
    inputs: usize,
    /// Channels per plane (1 or 2).
    per_input: usize,
    /// Output channels rounded up to whole tiles.
    channels: usize,
    /// Output positions computed, rounded up to whole tiles (the row stride
    /// of the wide output).
    stride: usize,
    /// Words per input plane: the tall padded image plus the reads past its
    /// last position that the rounded-up tiles make.
    plane: usize,
    /// Offset of each tap (ky, kx) in a plane: `ky · wp + kx`.
    offsets: Vec<usize>,
}

impl Layout {
    fn new(g: Geometry, per_input: usize) -> Self {
        let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
        let (out_h, out_w) = (hp + 1 - g.kh, wp + 1 - g.kw);
        assert!(out_h > 0 && out_w > 0 && g.n > 0);
        let positions = ((g.n - 1) * hp + out_h - 1) * wp + out_w;
        let stride = positions.next_multiple_of(TILE_POSITIONS);
        Layout {
            inputs: g.c.div_ceil(per_input),
            per_input,
            channels: g.o.next_multiple_of(TILE_CHANNELS),
            stride,
            // The last tap's reads end at (kh − 1) · wp + kw − 1 + stride, which is
            // n · hp · wp plus the rounding of `stride`.
            plane: g.n * hp * wp + (stride - positions),
            offsets: (0..g.kh)
                .flat_map(|ky| (0..g.kw).map(move |kx| ky * wp + kx))
                .collect(),
        }
    }

    /// The images as padded planes; `convert(rows, dst)` writes one image row
    /// of this plane's channels (`per_input` rows, missing channels as empty
    /// slices) into `dst`.
    fn planes<E: Copy + Default + Send + Sync>(
        &self,
        g: Geometry,
        images: &[f32],
        convert: impl Fn([&[f32]; 2], &mut [E]) + Sync,
    ) -> Vec<E> {
        let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
        let image_plane = g.h * g.w;
        let mut planes = crate::memory::zeroed(self.inputs * self.plane);
        planes
            .par_chunks_mut(self.plane)
            .enumerate()
            .for_each(|(input, plane)| {
                for b in 0..g.n {
                    for y in 0..g.h {
                        let row = |ci: usize| -> &[f32] {
                            if ci >= g.c {
                                return &[];
                            }
                            let start = (b * g.c + ci) * image_plane + y * g.w;
                            &images[start..start + g.w]
                        };
                        let first = input * self.per_input;
                        let start = (b * hp + y + g.padding) * wp + g.padding;
                        convert([row(first), row(first + 1)], &mut plane[start..start + g.w]);
                    }
                }
            });
        planes
    }

    /// Fill `wide` (`channels × stride`) with the products, in tasks of up to
    /// 64 channels × 384 positions, narrower until every thread has work.
    fn run<E: Sync>(&self, planes: &[E], packed: &[E], wide: &mut [f32], kernel: Kernel<E>) {
        let taps = self.offsets.len();
        let mut task_positions = MAX_TASK_POSITIONS.min(self.stride);
        let task_channels = MAX_TASK_CHANNELS.min(self.channels);
        let wanted = 4 * rayon::current_num_threads();
        let count = |positions: usize| {
            self.channels.div_ceil(task_channels) * self.stride.div_ceil(positions)
        };
        while count(task_positions) < wanted && task_positions > TILE_POSITIONS {
            task_positions = (task_positions / 2).next_multiple_of(TILE_POSITIONS);
        }
        let position_blocks = self.stride.div_ceil(task_positions);
        let channel_blocks = self.channels.div_ceil(task_channels);
        let largest_offset = self.offsets.iter().copied().max().unwrap_or(0);
        assert!(
            largest_offset + self.stride <= self.plane && planes.len() >= self.inputs * self.plane
        );
        assert!(
            packed.len() >= self.channels * self.inputs * taps
                && wide.len() >= self.channels * self.stride
        );
        let wide_ptr = DisjointOut::new(wide);
        let task = |index: usize| {
            let (channel_block, position_block) =
                (index / position_blocks, index % position_blocks);
            let first_channel = channel_block * task_channels;
            let channels = task_channels.min(self.channels - first_channel);
            let first_position = position_block * task_positions;
            let positions = task_positions.min(self.stride - first_position);
            for first_input in (0..self.inputs).step_by(BLOCK_INPUTS) {
                let inputs = BLOCK_INPUTS.min(self.inputs - first_input);
                for position in (first_position..first_position + positions).step_by(TILE_POSITIONS)
                {
                    for channel in (first_channel..first_channel + channels).step_by(TILE_CHANNELS)
                    {
                        let tile = channel / TILE_CHANNELS;
                        let tile_spec = Tile {
                            weights: &packed
                                [((tile * self.inputs + first_input) * taps) * TILE_CHANNELS..],
                            image: &planes[first_input * self.plane + position..],
                            plane: self.plane,
                            inputs,
                            offsets: &self.offsets,
                            accumulate: first_input > 0,
                        };
                        // SAFETY: the asserts above bound every read (the
                        // tile's last input plane ends at its plane's end,
                        // and position + 47 + largest offset < plane); this
                        // task alone writes channels first_channel..+channels,
                        // positions first_position..+positions of `wide`.
                        unsafe {
                            kernel(
                                &tile_spec,
                                wide_ptr.get().add(channel * self.stride + position),
                                self.stride,
                            );
                        }
                    }
                }
            }
        };
        (0..channel_blocks * position_blocks)
            .into_par_iter()
            .for_each(task);
    }
}

/// One microkernel call: 8 output channels × 48 positions over `inputs` planes.
struct Tile<'a, E> {
    /// The tile's packed weights from its first input on.
    weights: &'a [E],
    /// The first input plane from the tile's first position on.
    image: &'a [E],
    plane: usize,
    inputs: usize,
    offsets: &'a [usize],
    /// Add to what the output holds (later input blocks) rather than overwrite.
    accumulate: bool,
}

/// A microkernel: `c` points at 8 rows of 48 floats, `c_stride` apart.
type Kernel<E> = unsafe fn(&Tile<'_, E>, *mut f32, usize);

fn bf16_bits(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

/// One row of a pair plane: word j holds bf16(`low[j]`) and bf16(`high[j]`)
/// (zero when `high` is empty: the last plane of an odd channel count).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
fn pair_row(low: &[f32], high: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let zeros = [0f32; 16];
    let interleave: [i16; 32] = std::array::from_fn(|i| ((i % 2) * 16 + i / 2) as i16);
    // SAFETY: 32 16-bit indices are in bounds of the array.
    let interleave = unsafe { _mm512_loadu_si512(interleave.as_ptr().cast()) };
    let whole = dst.len() / 16;
    for i in 0..whole {
        let high_src = if high.is_empty() {
            &zeros[..]
        } else {
            &high[16 * i..16 * i + 16]
        };
        // SAFETY: 16 floats from 16·i of `low` and of `high_src`, and 16
        // words from 16·i of `dst`, are in bounds.
        unsafe {
            let packed = _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(high_src.as_ptr()),
                _mm512_loadu_ps(low.as_ptr().add(16 * i)),
            );
            let packed: __m512i = std::mem::transmute(packed);
            let words = _mm512_permutexvar_epi16(interleave, packed);
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i).cast(), words);
        }
    }
    for j in 16 * whole..dst.len() {
        let high = high.get(j).map_or(0, |&v| bf16_bits(v));
        dst[j] = bf16_bits(low[j]) | (high << 16);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pair_row(_: &[f32], _: &[f32], _: &mut [u32]) {
    unreachable!("the bf16 kernel exists only on x86-64")
}

/// A tile's sums: zero, or what `c` holds when accumulating.
///
/// # Safety
/// AVX-512F; `c` as [`Kernel`] says.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_sums(
    c: *const f32,
    c_stride: usize,
    accumulate: bool,
) -> [[std::arch::x86_64::__m512; 3]; TILE_CHANNELS] {
    use std::arch::x86_64::*;
    std::array::from_fn(|r| {
        std::array::from_fn(|v| {
            if accumulate {
                // SAFETY: as the caller promised.
                unsafe { _mm512_loadu_ps(c.add(r * c_stride + 16 * v)) }
            } else {
                _mm512_setzero_ps()
            }
        })
    })
}

/// Store a tile's sums.
///
/// # Safety
/// AVX-512F; `c` as [`Kernel`] says.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_sums(
    sums: &[[std::arch::x86_64::__m512; 3]; TILE_CHANNELS],
    c: *mut f32,
    c_stride: usize,
) {
    use std::arch::x86_64::*;
    for (r, row) in sums.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            // SAFETY: as the caller promised.
            unsafe { _mm512_storeu_ps(c.add(r * c_stride + 16 * v), *sum) };
        }
    }
}

/// How one word of image and one of weight enter a tile's sums: the only
/// difference between the f32 and the bf16 microkernels.
#[cfg(target_arch = "x86_64")]
trait Products16 {
    type Word: Copy;
    type Vector: Copy;
    /// 16 image words from `p`.
    unsafe fn load(p: *const Self::Word) -> Self::Vector;
    /// One weight word in every lane.
    unsafe fn splat(weight: Self::Word) -> Self::Vector;
    /// `sum + x · weight` (per pair of inputs, for bf16).
    unsafe fn madd(
        sum: std::arch::x86_64::__m512,
        x: Self::Vector,
        weight: Self::Vector,
    ) -> std::arch::x86_64::__m512;
}

/// f32 words: one FMA per lane.
#[cfg(target_arch = "x86_64")]
struct F32Products;

#[cfg(target_arch = "x86_64")]
impl Products16 for F32Products {
    type Word = f32;
    type Vector = std::arch::x86_64::__m512;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::Vector {
        // SAFETY: as the microkernel's caller promised.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn splat(weight: f32) -> Self::Vector {
        // SAFETY: only reached from the AVX-512 microkernel.
        unsafe { std::arch::x86_64::_mm512_set1_ps(weight) }
    }
    #[inline(always)]
    unsafe fn madd(
        sum: std::arch::x86_64::__m512,
        x: Self::Vector,
        weight: Self::Vector,
    ) -> std::arch::x86_64::__m512 {
        // SAFETY: only reached from the AVX-512 microkernel.
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(weight, x, sum) }
    }
}

/// bf16 pair words: `vdpbf16ps` adds both products of a pair per lane.
#[cfg(target_arch = "x86_64")]
struct Bf16Products;

#[cfg(target_arch = "x86_64")]
impl Products16 for Bf16Products {
    type Word = u32;
    type Vector = std::arch::x86_64::__m512bh;
    #[inline(always)]
    unsafe fn load(p: *const u32) -> Self::Vector {
        // SAFETY: as the microkernel's caller promised; the transmute
        // reinterprets 16 words as 32 bf16 values.
        unsafe { std::mem::transmute(std::arch::x86_64::_mm512_loadu_si512(p.cast())) }
    }
    #[inline(always)]
    unsafe fn splat(weight: u32) -> Self::Vector {
        // SAFETY: only reached from the AVX512-BF16 microkernel.
        unsafe { std::mem::transmute(std::arch::x86_64::_mm512_set1_epi32(weight as i32)) }
    }
    #[inline(always)]
    unsafe fn madd(
        sum: std::arch::x86_64::__m512,
        x: Self::Vector,
        weight: Self::Vector,
    ) -> std::arch::x86_64::__m512 {
        // SAFETY: only reached from the AVX512-BF16 microkernel.
        unsafe { std::arch::x86_64::_mm512_dpbf16_ps(sum, x, weight) }
    }
}

/// The microkernel's body, compiled into each of the feature-gated kernels
/// below.
///
/// # Safety
/// The CPU has the features of `P`; every plane read (`inputs` planes from
/// `image`, 48 words past each tap offset) is inside `image`, the weights
/// hold `inputs · taps · 8` words, and `c` is as [`Kernel`] says, written by
/// no one else.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_body<P: Products16>(tile: &Tile<'_, P::Word>, c: *mut f32, c_stride: usize) {
    let taps = tile.offsets.len();
    debug_assert!(tile.weights.len() >= tile.inputs * taps * TILE_CHANNELS);
    // SAFETY (all blocks below): as the caller promised.
    let mut sums = unsafe { load_sums(c, c_stride, tile.accumulate) };
    let mut w = tile.weights.as_ptr();
    for input in 0..tile.inputs {
        let base = unsafe { tile.image.as_ptr().add(input * tile.plane) };
        for &offset in tile.offsets {
            unsafe {
                let p = base.add(offset);
                let x = [P::load(p), P::load(p.add(16)), P::load(p.add(32))];
                for (r, row) in sums.iter_mut().enumerate() {
                    let weight = P::splat(*w.add(r));
                    for (sum, x) in row.iter_mut().zip(&x) {
                        *sum = P::madd(*sum, *x, weight);
                    }
                }
                w = w.add(TILE_CHANNELS);
            }
        }
    }
    unsafe { store_sums(&sums, c, c_stride) };
}

/// The f32 microkernel.
///
/// # Safety
/// As [`tile_body`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32(tile: &Tile<'_, f32>, c: *mut f32, c_stride: usize) {
    // SAFETY: as the caller promised.
    unsafe { tile_body::<F32Products>(tile, c, c_stride) }
}

/// The bf16 microkernel.
///
/// # Safety
/// As [`tile_body`], with AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn tile_bf16(tile: &Tile<'_, u32>, c: *mut f32, c_stride: usize) {
    // SAFETY: as the caller promised.
    unsafe { tile_body::<Bf16Products>(tile, c, c_stride) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_f32(_: &Tile<'_, f32>, _: *mut f32, _: usize) {
    unreachable!("the direct kernels exist only on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_bf16(_: &Tile<'_, u32>, _: *mut f32, _: usize) {
    unreachable!("the direct kernels exist only on x86-64")
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::Products;
    use crate::conv::{PackedConv, conv2d_packed};

    const SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 9] = [
        // (batch, in, out, h, w, kernel, padding)
        (1, 150, 20, 40, 40, 3, 1),
        (1, 6, 5, 40, 36, 5, 2),
        (2, 3, 8, 17, 13, 3, 1),
        (1, 5, 13, 9, 11, 3, 0),
        (2, 150, 20, 9, 7, 3, 1),
        (1, 6, 5, 12, 10, 5, 2),
        (2, 7, 9, 6, 5, 1, 0),
        (1, 64, 70, 33, 31, 3, 1),
        (3, 2, 3, 4, 4, 3, 1),
    ];

    fn case(
        (n, c, o, h, w, k, _): (usize, usize, usize, usize, usize, usize, usize),
    ) -> (Tensor, Tensor, Tensor) {
        let device = Device::Cpu;
        (
            Tensor::randn(0f32, 1.0, (n, c, h, w), &device).unwrap(),
            Tensor::randn(0f32, 1.0, (o, c, k, k), &device).unwrap(),
            Tensor::randn(0f32, 1.0, o, &device).unwrap(),
        )
    }

    /// f32 sums of `c · k²` unit-variance products in another order: a few
    /// units in the last place of the largest partial sums, about √(c · k²)
    /// × 4 in size, allowing for 64 ulps of that.
    fn tolerance((_, c, _, _, _, k, _): (usize, usize, usize, usize, usize, usize, usize)) -> f64 {
        64.0 * f64::from(f32::EPSILON) * 4.0 * ((c * k * k) as f64).sqrt()
    }

    fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Tensor {
        crate::conv::tests::candle_reference(x, weight, bias, 1, padding)
    }

    fn round_bf16(t: &Tensor) -> Tensor {
        t.to_dtype(candle_core::DType::BF16)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    }

    /// f32 products against candle's convolution: odd sizes, several input
    /// blocks, channel counts off the 8-channel tiles, 1×1 and 5×5 kernels.
    #[test]
    fn f32_kernel_matches_candle() {
        if !super::available(Products::F32) {
            eprintln!("skipped: this CPU has no AVX-512 (conv.rs tests the other paths)");
            return;
        }
        for shape in SHAPES {
            let (x, weight, bias) = case(shape);
            let packed = PackedConv::pack(&weight, Products::F32).unwrap();
            let ours = conv2d_packed(&x, &packed, Some(&bias), shape.6).unwrap();
            let theirs = reference(&x, &weight, &bias, shape.6);
            assert_eq!(ours.dims(), theirs.dims());
            let diff = crate::parity::compare(&ours, &theirs).unwrap().max_abs;
            assert!(diff < tolerance(shape), "{shape:?}: {diff}");
        }
    }

    /// bf16 products against the f32 convolution of the bf16-rounded image
    /// and weights: only the order of the f32 sums separates them.
    #[test]
    fn bf16_kernel_matches_the_rounded_convolution() {
        if !super::available(Products::Bf16) {
            eprintln!("skipped: this CPU has no AVX512-BF16 (bf16 layers run f32 there)");
            return;
        }
        for shape in SHAPES {
            let (x, weight, bias) = case(shape);
            let packed = PackedConv::pack(&weight, Products::Bf16).unwrap();
            assert_eq!(packed.dense().unwrap().dims(), weight.dims());
            let ours = conv2d_packed(&x, &packed, Some(&bias), shape.6).unwrap();
            let theirs = reference(&round_bf16(&x), &round_bf16(&weight), &bias, shape.6);
            assert_eq!(ours.dims(), theirs.dims());
            let diff = crate::parity::compare(&ours, &theirs).unwrap().max_abs;
            assert!(diff < tolerance(shape), "{shape:?}: {diff}");
            // And it is not the f32 result: the rounding is there.
            let exact = reference(&x, &weight, &bias, shape.6);
            let rounding = crate::parity::compare(&ours, &exact).unwrap().max_abs;
            assert!(
                rounding > 1e-4,
                "{shape:?}: bf16 result equals f32 ({rounding})"
            );
        }
    }
}
