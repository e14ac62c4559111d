//! Single-flight: concurrent callers asking for the same key share one run of
//! the work (one download, one parse) and all get its result.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

struct Flight<V> {
    /// None while running; Some(None) if the leader panicked.
    outcome: Mutex<Option<Option<V>>>,
    finished: Condvar,
}

/// Work in progress, by key.
pub struct SingleFlight<K, V> {
    running: Mutex<HashMap<K, Arc<Flight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            running: Mutex::new(HashMap::new()),
        }
    }
}

/// Ends the leader's flight even if its work panics.
struct Landing<'a, K: Hash + Eq, V: Clone> {
    owner: &'a SingleFlight<K, V>,
    key: Option<K>,
    flight: Arc<Flight<V>>,
    value: Option<V>,
}

impl<K: Hash + Eq, V: Clone> Drop for Landing<'_, K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Ok(mut running) = self.owner.running.lock()
        {
            running.remove(&key);
        }
        if let Ok(mut outcome) = self.flight.outcome.lock() {
            *outcome = Some(self.value.take());
        }
        self.flight.finished.notify_all();
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// The result of `work` for `key`: run here, or shared with a caller
    /// already running it. If that caller panicked, the work runs here.
    pub fn run(&self, key: K, work: impl FnOnce() -> V) -> V {
        let joined = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.get(&key) {
                Some(flight) => Some(Arc::clone(flight)),
                None => {
                    let flight = Arc::new(Flight {
                        outcome: Mutex::new(None),
                        finished: Condvar::new(),
                    });
                    running.insert(key.clone(), Arc::clone(&flight));
                    drop(running);
                    let mut landing = Landing {
                        owner: self,
                        key: Some(key),
                        flight,
                        value: None,
                    };
                    let value = work();
                    landing.value = Some(value.clone());
                    return value;
                }
            }
        };
        if let Some(flight) = joined {
            let mut outcome = flight.outcome.lock().unwrap_or_else(|e| e.into_inner());
            while outcome.is_none() {
                outcome = flight
                    .finished
                    .wait(outcome)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if let Some(Some(value)) = outcome.as_ref() {
                return value.clone();
            }
        }
        work()
    }

    /// Keys being worked on now.
    pub fn in_flight(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_one_run() {
        let flights = SingleFlight::<&str, usize>::default();
        let runs = AtomicUsize::new(0);
        let results: Vec<usize> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        flights.run("lora", || {
                            std::thread::sleep(Duration::from_millis(100));
                            runs.fetch_add(1, Ordering::SeqCst) + 41
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|&r| r == 41), "{results:?}");
        assert_eq!(flights.in_flight(), 0);
        // A later call runs again (results are not cached here).
        assert_eq!(flights.run("lora", || 7), 7);
    }

    #[test]
    fn a_panicking_leader_does_not_strand_waiters() {
        let flights = SingleFlight::<u8, u8>::default();
        std::thread::scope(|scope| {
            let leader = scope.spawn(|| {
                flights.run(1, || {
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("boom")
                })
            });
            std::thread::sleep(Duration::from_millis(20));
            let follower = scope.spawn(|| flights.run(1, || 5));
            assert!(leader.join().is_err());
            assert_eq!(follower.join().unwrap(), 5);
        });
    }
}
