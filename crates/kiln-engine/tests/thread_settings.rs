//! Start-up thread settings (one test in its own process: it changes the
//! environment, which no other thread may read meanwhile).

use kiln_engine::threads::{BARRIER_SPIN_LIMIT, ThreadCount, settle_thread_count};

#[test]
fn start_up_settles_threads_and_caps_barrier_spinning_unless_the_user_chose() {
    // SAFETY: this binary's only test; nothing else reads the environment.
    unsafe {
        std::env::remove_var("RAYON_NUM_THREADS");
        std::env::remove_var("CANDLE_NUM_THREADS");
        std::env::remove_var("CANDLE_BARRIER_POOL_SPIN_LIMIT");
    }
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(settle_thread_count(), ThreadCount::Set(count));
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").unwrap(),
        count.to_string()
    );
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap(),
        BARRIER_SPIN_LIMIT.to_string()
    );
    // SAFETY: as above.
    unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "5000") };
    assert_eq!(settle_thread_count(), ThreadCount::LeftToEnvironment);
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap(),
        "5000"
    );
}
