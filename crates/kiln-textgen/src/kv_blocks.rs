//! The paged cache's block bookkeeping: a pool of fixed-size blocks handed to
//! sequences, reference-counted so that sequences with the same prefix share
//! them; full blocks keyed by a hash chain over their tokens (prefix caching,
//! as vLLM's block manager), and blocks nobody holds kept with their contents
//! until they are needed again, evicted least recently used first.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// A block's index in the pool (and in the model's cache tensors).
pub type BlockId = u32;

/// The hash chain's seed: the "parent" of a sequence's first block.
const ROOT: u64 = 0x6b69_6c6e_2d6b_7663;

/// What a full, cached block holds: its hash, its parent's hash and its tokens
/// (compared on a hit, so a hash collision can never share the wrong keys).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    key: Option<BlockKey>,
    /// When it was last released (for least-recently-used eviction).
    released_at: u64,
}

/// A prefix found in the cache: blocks now held by the caller, and the hash
/// of each (the chain to continue from).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<u64>,
}

/// The pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    meta: Vec<BlockMeta>,
    /// Unheld blocks with nothing worth keeping.
    empty: Vec<BlockId>,
    /// Unheld blocks that still hold a cached prefix, oldest release first.
    evictable: BTreeSet<(u64, BlockId)>,
    by_hash: HashMap<u64, BlockId>,
    clock: u64,
    prefix_caching: bool,
}

/// The hash of a full block of `tokens` after the block hashed `parent`.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockPool {
            block_size,
            meta: vec![BlockMeta::default(); num_blocks],
            // Popped from the end: block 0 is handed out first.
            empty: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeSet::new(),
            by_hash: HashMap::new(),
            clock: 0,
            prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that can be handed out now (empty or evictable).
    pub fn free_blocks(&self) -> usize {
        self.empty.len() + self.evictable.len()
    }

    /// The share of blocks held by sequences, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.meta.is_empty() {
            return 0.0;
        }
        1.0 - self.free_blocks() as f64 / self.meta.len() as f64
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Take the longest cached prefix of `prompt`'s full blocks, leaving at
    /// least its last token to compute (its logits are needed). The blocks
    /// found are held for the caller.
    pub fn lookup_prefix(&mut self, prompt: &[u32]) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching || prompt.is_empty() {
            return hit;
        }
        let usable = (prompt.len() - 1) / self.block_size;
        let mut parent = ROOT;
        for tokens in prompt.chunks_exact(self.block_size).take(usable) {
            let hash = chain_hash(parent, tokens);
            let Some(&block) = self.by_hash.get(&hash) else {
                break;
            };
            let matches = self.meta[block as usize]
                .key
                .as_ref()
                .is_some_and(|k| k.parent == parent && k.tokens == tokens);
            if !matches {
                break;
            }
            self.hold(block);
            hit.blocks.push(block);
            hit.hashes.push(hash);
            parent = hash;
        }
        hit
    }

    fn hold(&mut self, block: BlockId) {
        let meta = &mut self.meta[block as usize];
        if meta.refs == 0 {
            self.evictable.remove(&(meta.released_at, block));
        }
        meta.refs += 1;
    }

    /// A block for new tokens, held once; `None` when the pool is exhausted.
    /// Empty blocks go first, then the least recently released cached one
    /// (which leaves the prefix cache).
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.empty.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                if let Some(key) = self.meta[block as usize].key.take() {
                    self.by_hash.remove(&key.hash);
                }
                block
            }
        };
        self.meta[block as usize].refs = 1;
        Some(block)
    }

    /// Let go of a sequence's blocks, last first, so that a sequence's tail
    /// is evicted before its head (the head is what others share).
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            self.clock += 1;
            let meta = &mut self.meta[block as usize];
            meta.refs = meta.refs.saturating_sub(1);
            if meta.refs > 0 {
                continue;
            }
            meta.released_at = self.clock;
            if meta.key.is_some() {
                self.evictable.insert((self.clock, block));
            } else {
                self.empty.push(block);
            }
        }
    }

    /// Record that `block` now holds the full block `tokens` after the block
    /// hashed `parent`; returns its hash (the next block's parent). A block
    /// whose contents are already cached elsewhere stays private.
    pub fn register_full(&mut self, block: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let hash = chain_hash(parent, tokens);
        if self.prefix_caching && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, block);
            self.meta[block as usize].key = Some(BlockKey {
                hash,
                parent,
                tokens: tokens.to_vec(),
            });
        }
        hash
    }

    /// The first parent of every chain.
    pub fn root() -> u64 {
        ROOT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fill `blocks` with the full blocks of `tokens` as the scheduler does.
    fn register(pool: &mut BlockPool, blocks: &[BlockId], tokens: &[u32]) {
        let mut parent = BlockPool::root();
        for (block, chunk) in blocks.iter().zip(tokens.chunks_exact(pool.block_size())) {
            parent = pool.register_full(*block, parent, chunk);
        }
    }

    #[test]
    fn shared_prefix_is_found_reference_counted_and_evicted_last() {
        let mut pool = BlockPool::new(6, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let a: Vec<BlockId> = (0..3).filter_map(|_| pool.allocate()).collect();
        register(&mut pool, &a, &prompt);
        assert_eq!(pool.free_blocks(), 3);

        // Same 8-token prefix: both full blocks are shared, not copied.
        let mut other = prompt[..8].to_vec();
        other.extend([99, 98, 97]);
        let hit = pool.lookup_prefix(&other);
        assert_eq!(hit.blocks, a[..2].to_vec());
        assert_eq!(pool.free_blocks(), 3);

        // A prompt that is exactly cached still leaves its last token to compute.
        pool.release(&hit.blocks);
        assert_eq!(pool.lookup_prefix(&prompt[..8]).blocks.len(), 1);
        pool.release(&a[..1]);

        // Once nobody holds them, cached blocks stay findable until evicted,
        // and the tail goes before the head.
        pool.release(&a);
        assert_eq!(pool.free_blocks(), 6);
        let fresh: Vec<BlockId> = (0..4).filter_map(|_| pool.allocate()).collect();
        assert_eq!(fresh.len(), 4);
        assert!(
            !fresh.contains(&a[0]) && !fresh.contains(&a[1]),
            "{fresh:?}"
        );
        let again = pool.lookup_prefix(&other);
        assert_eq!(again.blocks, a[..2].to_vec());
        pool.release(&again.blocks);
        assert_eq!(pool.allocate(), Some(a[1]), "the tail is evicted first");
        assert_eq!(pool.lookup_prefix(&other).blocks, vec![a[0]]);
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn colliding_hash_with_other_tokens_is_no_hit() {
        let mut pool = BlockPool::new(2, 2, true);
        let block = pool.allocate().expect("block");
        let hash = pool.register_full(block, BlockPool::root(), &[1, 2]);
        // Forge a collision: the map points the other block's hash here.
        let forged = chain_hash(BlockPool::root(), &[3, 4]);
        pool.by_hash.insert(forged, block);
        assert!(pool.lookup_prefix(&[3, 4, 5]).blocks.is_empty());
        assert_eq!(pool.lookup_prefix(&[1, 2, 5]).hashes, vec![hash]);
    }

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut pool = BlockPool::new(2, 2, false);
        let block = pool.allocate().expect("block");
        pool.register_full(block, BlockPool::root(), &[1, 2]);
        assert!(pool.lookup_prefix(&[1, 2, 3]).blocks.is_empty());
        pool.release(&[block]);
        assert_eq!(pool.free_blocks(), 2);
    }
}
