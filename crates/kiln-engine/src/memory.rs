//! Process allocator settings for tensor work. glibc's malloc serves every
//! block over its mmap threshold (128 KiB, raised only as blocks are freed) with
//! a fresh `mmap` and gives it back with `munmap` when freed, and trims the heap
//! top at 128 KiB of free space: each forward pass then pays page faults and
//! page clearing for every activation. Measured on the FLUX mid-size
//! benchmark (2 cores): 11 s of 33 s was kernel time, and the forward went
//! 0.96 s → 0.82 s with the settings below. Blocks up to 32 MiB (glibc's
//! ceiling for the threshold) now come from the heap, and up to 1 GiB of free
//! heap is kept for the next request; `release_free_memory` hands it back when
//! a model is unloaded.

/// What [`tune_allocator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// The settings were applied.
    Applied,
    /// `MALLOC_*` or `GLIBC_TUNABLES` is set: the user's choice stands.
    LeftToEnvironment,
    /// Not glibc (or a setting was refused): nothing changed.
    Unsupported,
}

/// Whether the user tunes malloc through `MALLOC_*` or `GLIBC_TUNABLES`.
fn malloc_set_by_environment() -> bool {
    std::env::vars_os().any(|(name, _)| {
        name.to_str()
            .is_some_and(|name| name.starts_with("MALLOC_") || name == "GLIBC_TUNABLES")
    })
}

/// The heap's mmap threshold: glibc refuses values above 32 MiB on 64-bit.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free space kept at the heap top before it is returned to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;
/// Extra space requested with each heap growth.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 64 << 20;

/// Apply the settings above once, at start-up, before large allocations.
pub fn tune_allocator() -> AllocatorTuning {
    if malloc_set_by_environment() {
        return AllocatorTuning::LeftToEnvironment;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> AllocatorTuning {
    // SAFETY: mallopt only changes malloc's parameters; it takes malloc's lock.
    let applied = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
    };
    if applied {
        AllocatorTuning::Applied
    } else {
        AllocatorTuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> AllocatorTuning {
    AllocatorTuning::Unsupported
}

/// Bytes from which [`zeroed`] asks for transparent huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed buffer of `len` elements for a large activation. Blocks past
/// malloc's mmap threshold are fresh, untouched mappings; for those of 2 MiB
/// and more the kernel is asked for transparent huge pages (where THP is in
/// its usual `madvise` mode), so the first writes fault 2 MiB at a time
/// rather than 4 KiB: a 512² VAE activation (128 MiB) otherwise takes 32,768
/// faults each time it is written.
pub fn zeroed<T: Clone + Default>(len: usize) -> Vec<T> {
    let buffer = vec![T::default(); len];
    let bytes = len * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= 2 * HUGE_PAGE {
        let start = (buffer.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (buffer.as_ptr() as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside this buffer's allocation, and
            // MADV_HUGEPAGE only changes how its pages are backed; failure
            // (THP off) leaves it as it was.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    let _ = bytes;
    buffer
}

/// Return free heap memory to the OS (after unloading a model's weights).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it takes malloc's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_are_zero_whatever_their_size() {
        for len in [0, 1, 1000, 3 << 20] {
            let buffer: Vec<f32> = super::zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn settings_are_accepted_by_this_platforms_malloc() {
        let tuning = tune_allocator();
        if cfg!(all(target_os = "linux", target_env = "gnu")) && !malloc_set_by_environment() {
            assert_eq!(tuning, AllocatorTuning::Applied);
        }
        // The heap still works, large blocks included, and can be trimmed.
        let blocks: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; 40 << 20]).collect();
        assert!(
            blocks
                .iter()
                .enumerate()
                .all(|(i, b)| b[b.len() - 1] == i as u8)
        );
        drop(blocks);
        release_free_memory();
    }
}
