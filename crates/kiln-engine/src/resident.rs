//! The bytes a model's weights hold once loaded: every tensor the weight
//! backends hand to model code while [`count_loaded`] runs is counted (after
//! its dtype conversion), and a layer quantized at load replaces its dense
//! weight's bytes with its blocks'. The result is what the model keeps in
//! memory, known right after load, for reports and the server's memory budget.

use std::cell::Cell;

use candle_core::Tensor;

thread_local! {
    static COUNTED: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Run `load` and return what it gave with the bytes of the weights it
/// loaded on this thread.
pub fn count_loaded<T>(load: impl FnOnce() -> T) -> (T, u64) {
    struct Restore(Option<i64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            COUNTED.with(|c| c.set(self.0));
        }
    }
    let outer = COUNTED.with(|c| c.replace(Some(0)));
    let restore = Restore(outer);
    let value = load();
    let counted = COUNTED.with(|c| c.get()).unwrap_or(0);
    drop(restore);
    // A scope inside another counts for both.
    if let Some(outer) = outer {
        COUNTED.with(|c| c.set(Some(outer + counted)));
    }
    (value, counted.max(0) as u64)
}

/// Count `bytes` more (or fewer) for the current load, if one is counted.
pub fn record(bytes: i64) {
    COUNTED.with(|c| {
        if let Some(total) = c.get() {
            c.set(Some(total + bytes));
        }
    });
}

/// The bytes of a tensor's elements.
pub fn tensor_bytes(tensor: &Tensor) -> i64 {
    (tensor.elem_count() * tensor.dtype().size_in_bytes()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_loads_count_for_both_and_nothing_leaks_outside() {
        record(5);
        let ((_, inner), outer) = count_loaded(|| {
            record(10);
            count_loaded(|| record(7))
        });
        assert_eq!((inner, outer), (7, 17));
        assert_eq!(count_loaded(|| ()).1, 0);
    }
}
