//! The CPU thread count for tensor work, settled once at start-up. candle asks
//! for its thread count on every matmul and, unless `RAYON_NUM_THREADS` (or
//! `CANDLE_NUM_THREADS`) is set, answers by parsing `/proc/cpuinfo` for the
//! physical core count each time: on an LLM decode step that is hundreds of
//! reads (about 5% of a tiny model's decode time in `perf`). Setting the
//! variable at start-up answers from the environment instead and makes every
//! pool (rayon's, candle's GEMM and its barrier pool) agree on one number.
//!
//! candle's barrier pool (its element-wise ops) keeps a worker spinning for
//! 25,000 rounds after each op; Kiln's kernels run on rayon's pool, so on a
//! machine with as many threads as cores that spinning worker takes a core
//! from them. Start-up caps the spin at [`BARRIER_SPIN_LIMIT`] rounds unless
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set: SDXL's mid UNet step at 256² in
//! bf16 went from 0.34–0.40 s to 0.28–0.29 s on a 2-vCPU Zen 5.

/// The spin rounds candle's barrier-pool workers wait before parking.
pub const BARRIER_SPIN_LIMIT: u32 = 200;

/// What [`settle_thread_count`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadCount {
    /// `RAYON_NUM_THREADS` was set to this many threads.
    Set(usize),
    /// The user set `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`: it stands.
    LeftToEnvironment,
}

/// Set `RAYON_NUM_THREADS` to the CPUs this process may use, unless the user
/// chose a count, and cap candle's barrier-pool spinning (unless the user set
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`). Call at the very start of `main`,
/// before any thread exists.
pub fn settle_thread_count() -> ThreadCount {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none_or(|v| v.is_empty()) {
        // SAFETY: as below, the only thread is this one.
        unsafe {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                BARRIER_SPIN_LIMIT.to_string(),
            )
        };
    }
    let chosen = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if chosen {
        return ThreadCount::LeftToEnvironment;
    }
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: called first thing in `main`, while this is the only thread, so
    // nothing reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", count.to_string()) };
    ThreadCount::Set(count)
}
