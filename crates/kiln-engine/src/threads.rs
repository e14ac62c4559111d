//! The CPU thread count for tensor work, settled once at start-up. candle asks
//! for its thread count on every matmul and, unless `RAYON_NUM_THREADS` (or
//! `CANDLE_NUM_THREADS`) is set, answers by parsing `/proc/cpuinfo` for the
//! physical core count each time: on an LLM decode step that is hundreds of
//! reads (about 5% of a tiny model's decode time in `perf`). Setting the
//! variable at start-up answers from the environment instead and makes every
//! pool (rayon's, candle's GEMM and its barrier pool) agree on one number.

/// What [`settle_thread_count`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadCount {
    /// `RAYON_NUM_THREADS` was set to this many threads.
    Set(usize),
    /// The user set `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`: it stands.
    LeftToEnvironment,
}

/// Set `RAYON_NUM_THREADS` to the CPUs this process may use, unless the user
/// chose a count. Call at the very start of `main`, before any thread exists.
pub fn settle_thread_count() -> ThreadCount {
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
