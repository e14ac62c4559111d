//! Attention over a paged key/value cache on the CPU: every query token of a
//! batch (each sequence at its own position, with its own block table) reads
//! its sequence's keys and values straight from fixed-size blocks, with the
//! causal rule and an optional sliding window, in f32 — no per-step copy of
//! any sequence's cache.

use rayon::prelude::*;

use crate::cpu_op;

/// One layer's cache as the kernel reads it: `[slot][kv_head][head_dim]`
/// rows, where slot `b · block_size + i` is position `i` of block `b`.
#[derive(Debug, Clone, Copy)]
pub struct PagedLayer<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Where one query token looks: its position in its sequence and that
/// sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct QueryToken<'a> {
    pub position: usize,
    pub blocks: &'a [u32],
}

/// Work (multiply-adds) below which the kernel stays on the calling thread: a
/// woken rayon worker costs more than a few small heads.
const PARALLEL_WORK: usize = 1 << 17;

impl PagedLayer<'_> {
    /// The cache row of (`position` in a sequence with `blocks`, `kv_head`).
    fn row(&self, blocks: &[u32], position: usize, kv_head: usize) -> usize {
        let block = blocks[position / self.block_size] as usize;
        let slot = block * self.block_size + position % self.block_size;
        (slot * self.kv_heads + kv_head) * self.head_dim
    }
}

/// `softmax(q·kᵀ · scale) · v` for every query token and head.
///
/// `queries` is `[token][head][head_dim]` with `heads` a multiple of the
/// layer's `kv_heads` (grouped queries share their key/value head); keys
/// `lo..=position` are visible, `lo = position + 1 − window` with a window.
/// Returns the outputs in the queries' layout. The caller guarantees every
/// position's block is in the table (the scheduler allocates them first).
pub fn paged_attention(
    layer: PagedLayer<'_>,
    queries: &[f32],
    tokens: &[QueryToken<'_>],
    heads: usize,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let fma = cpu_op::has_avx2_fma();
    paged_attention_with(layer, queries, tokens, heads, scale, window, fma)
}

/// [`paged_attention`] with the AVX2+FMA path chosen by the caller.
fn paged_attention_with(
    layer: PagedLayer<'_>,
    queries: &[f32],
    tokens: &[QueryToken<'_>],
    heads: usize,
    scale: f32,
    window: Option<usize>,
    fma: bool,
) -> Vec<f32> {
    let d = layer.head_dim;
    let mut out = vec![0f32; queries.len()];
    let job = Job {
        layer,
        queries,
        tokens,
        heads,
        groups: heads / layer.kv_heads.max(1),
        scale,
        window,
    };
    let one_head = |index: usize, dst: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: the caller checked that the CPU has AVX2 and FMA.
            return unsafe { job.head_avx2_fma(index, dst) };
        }
        job.head::<false>(index, dst)
    };
    let work: usize = tokens
        .iter()
        .map(|t| job.visible(t.position).len() * heads * d)
        .sum();
    if work < PARALLEL_WORK {
        out.chunks_mut(d)
            .enumerate()
            .for_each(|(i, dst)| one_head(i, dst));
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each(|(i, dst)| one_head(i, dst));
    }
    out
}

/// One call's operands.
struct Job<'a> {
    layer: PagedLayer<'a>,
    queries: &'a [f32],
    tokens: &'a [QueryToken<'a>],
    heads: usize,
    groups: usize,
    scale: f32,
    window: Option<usize>,
}

impl Job<'_> {
    /// The keys a query at `position` sees.
    fn visible(&self, position: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (position + 1).saturating_sub(w));
        lo..position + 1
    }

    /// [`Job::head`] compiled for AVX2 with fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_avx2_fma(&self, index: usize, dst: &mut [f32]) {
        self.head::<true>(index, dst)
    }

    /// Attention of query row `index` (token-major, then head) into `dst`.
    /// `FMA`: multiply-adds fused (only where the CPU has them: elsewhere
    /// `mul_add` is a slow library call).
    #[inline(always)]
    fn head<const FMA: bool>(&self, index: usize, dst: &mut [f32]) {
        let layer = &self.layer;
        let d = layer.head_dim;
        let (token, head) = (index / self.heads, index % self.heads);
        let QueryToken { position, blocks } = self.tokens[token];
        let q = &self.queries[index * d..(index + 1) * d];
        let kv_head = head / self.groups;
        let keys = self.visible(position);
        // Plain loops, no closures: a closure would not inherit the caller's
        // target features, and its `mul_add` would become a library call.
        let mut scores = Vec::with_capacity(keys.len());
        for k in keys.clone() {
            let row = layer.row(blocks, k, kv_head);
            scores.push(dot::<FMA>(q, &layer.keys[row..row + d]) * self.scale);
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (k, p) in keys.zip(&scores) {
            let row = layer.row(blocks, k, kv_head);
            axpy::<FMA>(*p / sum, &layer.values[row..row + d], dst);
        }
    }
}

#[inline(always)]
fn multiply_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `Σ aᵢ·bᵢ` in eight lanes (vectorised by the compiler).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] = multiply_add::<FMA>(x[i], y[i], lanes[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in a_rest.iter().zip(b_rest) {
        tail = multiply_add::<FMA>(*x, *y, tail);
    }
    let mut sum = 0f32;
    for lane in lanes {
        sum += lane;
    }
    sum + tail
}

/// `dst += alpha · x`.
#[inline(always)]
fn axpy<const FMA: bool>(alpha: f32, x: &[f32], dst: &mut [f32]) {
    for (d, x) in dst.iter_mut().zip(x) {
        *d = multiply_add::<FMA>(*x, alpha, *d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention over plain per-sequence rows, the textbook way in f64.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        scale: f32,
        lo: usize,
    ) -> Vec<f32> {
        let scores: Vec<f64> = keys[lo..]
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let d = q.len();
        (0..d)
            .map(|j| {
                e.iter()
                    .zip(&values[lo..])
                    .map(|(p, v)| p / sum * v[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    fn pseudo(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn scattered_blocks_match_contiguous_attention() {
        let (block_size, kv_heads, d, heads) = (4, 2, 12, 4);
        let num_blocks = 8;
        let mut seed = 7;
        let row_len = kv_heads * d;
        let mut keys = vec![0f32; num_blocks * block_size * row_len];
        let mut values = keys.clone();
        // Sequence A: 10 tokens in blocks 5, 1, 6; sequence B: 3 tokens in block 2.
        let tables: [(&[u32], usize); 2] = [(&[5, 1, 6], 10), (&[2], 3)];
        let mut plain: Vec<Vec<(Vec<f32>, Vec<f32>)>> = Vec::new();
        for (blocks, len) in tables {
            let mut rows = Vec::new();
            for pos in 0..len {
                let slot = blocks[pos / block_size] as usize * block_size + pos % block_size;
                let k: Vec<f32> = (0..row_len).map(|_| pseudo(&mut seed)).collect();
                let v: Vec<f32> = (0..row_len).map(|_| pseudo(&mut seed)).collect();
                keys[slot * row_len..(slot + 1) * row_len].copy_from_slice(&k);
                values[slot * row_len..(slot + 1) * row_len].copy_from_slice(&v);
                rows.push((k, v));
            }
            plain.push(rows);
        }
        let layer = PagedLayer {
            keys: &keys,
            values: &values,
            block_size,
            kv_heads,
            head_dim: d,
        };
        // Queries: A at positions 7 and 9, B at 2.
        let tokens = [
            QueryToken {
                position: 7,
                blocks: tables[0].0,
            },
            QueryToken {
                position: 9,
                blocks: tables[0].0,
            },
            QueryToken {
                position: 2,
                blocks: tables[1].0,
            },
        ];
        let owner = [0usize, 0, 1];
        let queries: Vec<f32> = (0..tokens.len() * heads * d)
            .map(|_| pseudo(&mut seed))
            .collect();
        let fma = [false, cpu_op::has_avx2_fma()];
        for (window, fma) in [None, Some(3)]
            .into_iter()
            .flat_map(|w| fma.map(|f| (w, f)))
        {
            let out = paged_attention_with(layer, &queries, &tokens, heads, 0.3, window, fma);
            for (t, token) in tokens.iter().enumerate() {
                let rows = &plain[owner[t]][..=token.position];
                let lo = window.map_or(0, |w| (token.position + 1).saturating_sub(w));
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let k: Vec<Vec<f32>> = rows
                        .iter()
                        .map(|(k, _)| k[g * d..(g + 1) * d].to_vec())
                        .collect();
                    let v: Vec<Vec<f32>> = rows
                        .iter()
                        .map(|(_, v)| v[g * d..(g + 1) * d].to_vec())
                        .collect();
                    let q = &queries[(t * heads + h) * d..(t * heads + h + 1) * d];
                    let want = reference(q, &k, &v, 0.3, lo);
                    let got = &out[(t * heads + h) * d..(t * heads + h + 1) * d];
                    for (a, b) in want.iter().zip(got) {
                        assert!(
                            (a - b).abs() <= 1e-6,
                            "{window:?} token {t} head {h}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
