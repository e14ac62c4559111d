//! The batched forward over a paged key/value cache: the new tokens of every
//! scheduled sequence (prefill chunks and single decode tokens alike) go
//! through each layer's projections as one matrix, each token is rotated at
//! its own position, its keys and values are written into its sequence's
//! blocks, and attention reads the blocks in place.

use candle_core::{DType, Module, Result, Tensor};
use kiln_engine::paged_attention::{PagedLayer, QueryToken, paged_attention};

use super::config::LlmConfig;
use super::model::{CausalLm, Projection};
use super::rope::Rope;

/// Every layer's keys and values in `num_blocks` blocks of `block_size`
/// tokens (f32, `[slot][kv_head][head_dim]`); which block holds which
/// sequence's tokens is the caller's block tables.
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    row: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl PagedKvCache {
    /// A zeroed pool (the pages are only touched when first written).
    pub fn new(config: &LlmConfig, block_size: usize, num_blocks: usize) -> Self {
        let row = config.num_kv_heads * config.head_dim;
        let per_layer = num_blocks * block_size * row;
        PagedKvCache {
            block_size,
            num_blocks,
            row,
            keys: (0..config.num_layers)
                .map(|_| vec![0f32; per_layer])
                .collect(),
            values: (0..config.num_layers)
                .map(|_| vec![0f32; per_layer])
                .collect(),
        }
    }

    /// Bytes one block takes across all layers (keys and values, f32).
    pub fn bytes_per_block(config: &LlmConfig, block_size: usize) -> u64 {
        (2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * 4) as u64
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// One sequence's part of a batched step: `tokens` at positions
/// `start..start + tokens.len()`, cached in `blocks` (which must cover them);
/// `logits` asks for the next-token logits after its last token.
#[derive(Debug, Clone, Copy)]
pub struct PagedSequence<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
    pub logits: bool,
}

impl CausalLm {
    /// Run one batched step. Returns `(n, vocab)` f32 logits, one row per
    /// sequence that asked for them, in batch order (`None` when none did).
    ///
    /// Projections run each on their own (never candle's fused one-row
    /// kernel), so a row's arithmetic does not depend on what else is in the
    /// batch.
    pub fn forward_paged(
        &self,
        batch: &[PagedSequence<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Option<Tensor>> {
        let queries = self.check_batch(batch, cache)?;
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|s| s.start..s.start + s.tokens.len())
            .collect();
        let (cos, sin) = self.rope.tables_at(positions.iter().copied())?;
        let mut x = self.embed(&tokens)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_norm.forward(&x)?;
            let attended =
                self.paged_layer_attention(index, &normed, &cos, &sin, &queries, cache)?;
            x = layer.finish(&x, &attended, Projection::Separate)?;
        }
        // The last token of each sequence that wants logits: one head GEMM.
        let mut rows = Vec::new();
        let mut offset = 0;
        for s in batch {
            offset += s.tokens.len();
            if s.logits {
                rows.push((offset - 1) as u32);
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(rows.as_slice(), x.device())?;
        let last = x.squeeze(0)?.index_select(&rows, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(Some(logits.to_dtype(DType::F32)?))
    }

    /// Every sequence's blocks cover its tokens, inside the pool; returns each
    /// token's position and table.
    fn check_batch<'a>(
        &self,
        batch: &[PagedSequence<'a>],
        cache: &PagedKvCache,
    ) -> Result<Vec<QueryToken<'a>>> {
        if batch.iter().all(|s| s.tokens.is_empty()) {
            candle_core::bail!("no tokens to run");
        }
        let mut queries = Vec::new();
        for s in batch {
            let end = s.start + s.tokens.len();
            if s.blocks.len() * cache.block_size < end {
                candle_core::bail!(
                    "{} blocks of {} cannot hold {end} tokens",
                    s.blocks.len(),
                    cache.block_size
                );
            }
            if let Some(bad) = s.blocks.iter().find(|&&b| b as usize >= cache.num_blocks) {
                candle_core::bail!("block {bad} is outside the pool of {}", cache.num_blocks);
            }
            queries.extend((s.start..end).map(|position| QueryToken {
                position,
                blocks: s.blocks,
            }));
        }
        Ok(queries)
    }

    /// Layer `index`'s attention for the batch: project, rotate, store the new
    /// keys and values in their blocks, attend over the blocks, project out.
    fn paged_layer_attention(
        &self,
        index: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        queries: &[QueryToken<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let attention = &self.layers[index].attention;
        let [q, k, v] = attention.project(x, Projection::Separate)?;
        let q = Rope::apply_token_major(&q, cos, sin)?;
        let k = Rope::apply_token_major(&k, cos, sin)?;
        let host = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let (bs, row) = (cache.block_size, cache.row);
        let (keys, values) = (&mut cache.keys[index], &mut cache.values[index]);
        for (t, query) in queries.iter().enumerate() {
            let block = query.blocks[query.position / bs] as usize;
            let slot = block * bs + query.position % bs;
            keys[slot * row..(slot + 1) * row].copy_from_slice(&k[t * row..(t + 1) * row]);
            values[slot * row..(slot + 1) * row].copy_from_slice(&v[t * row..(t + 1) * row]);
        }
        let layer = PagedLayer {
            keys,
            values,
            block_size: bs,
            kv_heads: attention.kv_heads,
            head_dim: attention.head_dim,
        };
        let scale = 1.0 / (attention.head_dim as f32).sqrt();
        let out = paged_attention(layer, &q, queries, attention.heads, scale, attention.window);
        let width = attention.heads * attention.head_dim;
        let out = Tensor::from_vec(out, (1, queries.len(), width), x.device())?;
        attention.o.forward(&out.to_dtype(self.dtype)?)
    }
}
