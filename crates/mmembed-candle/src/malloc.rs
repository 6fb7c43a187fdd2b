//! A process-wide allocator setting for CPU inference, opt-in for binaries.

/// Makes glibc's `malloc` keep the large blocks a CPU forward pass frees in
/// every layer and hand them out again, instead of returning them to the
/// kernel and taking freshly zeroed pages back on the next layer.
///
/// Each encoder layer allocates and frees activations of tens of MB (at
/// ViT-B/32, batch 32: 20 MB for the MLP's hidden layer). With glibc's
/// defaults those blocks are unmapped or trimmed after use and fault back
/// in, page by page: measured 7.4 % of an int8 77-token text batch in page
/// faults and zeroing, 2.7 % with this setting (BENCHMARKS.md, issue #8).
/// It sets `M_MMAP_THRESHOLD` to 32 MiB (the most glibc accepts on 64-bit:
/// smaller blocks come from the heap), `M_TRIM_THRESHOLD` to 256 MiB (up
/// to that much freed memory stays in the process for reuse) and
/// `M_TOP_PAD` to 64 MiB. Peak memory does not grow; memory is simply not
/// handed back between layers.
///
/// Why the pad: threads other than the main one (the forward pass runs on
/// a rayon worker) allocate from arenas of 64 MiB heaps, and glibc unmaps
/// a heap as soon as it empties unless the heap before it lacks `M_TOP_PAD`
/// bytes of room; the trim threshold does not apply there. At 32 images the
/// layers' outputs spill into a second heap, which then came and went in
/// every layer: 1.2 million page faults in 6 s of int8 images ×32, 0.18
/// million with a 64 MiB pad (the size of a whole heap, so an empty one is
/// always kept), and 52 → 65 images/s (BENCHMARKS.md, issue #24, step 8).
/// Limiting glibc to one arena (`M_ARENA_MAX`) also stops those faults but
/// makes the pool's threads wait on its lock. The pad only reserves address
/// space: untouched pages cost no memory.
///
/// It changes the whole process's allocator, so the library never calls it
/// on its own: a program that runs batches of inference calls it once, at
/// the start of `main` (the `mmembed` CLI and the benchmarks do). Returns
/// whether all three settings took effect; elsewhere than Linux with glibc it
/// does nothing and returns `false`.
///
/// ```
/// let tuned = mmembed_candle::tune_malloc_for_inference();
/// assert_eq!(tuned, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn tune_malloc_for_inference() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts malloc's parameters; it takes the
        // allocator's lock and is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the pages of freed heap blocks back to the kernel (glibc's
/// `malloc_trim`), once, after a model is loaded.
///
/// Why: loading copies most weights once more (q/k/v concatenated, then
/// packed or quantised for our kernels) and frees the originals, and those
/// freed blocks sit between live ones, where `free` never returns memory;
/// with [`tune_malloc_for_inference`]'s raised trim threshold not even the
/// heap's top is returned. They stayed resident: peak RSS of the seeded
/// ViT-B/32 in f32 at 32 images 811 MB (1.34× the 605 MB of weights), 729
/// MB (1.20×) with this call (BENCHMARKS.md, issue #24, step 8). Only free
/// memory is released, so it is safe whatever the process is doing; the
/// pages a later forward pass reuses are faulted back once. Elsewhere than
/// Linux with glibc it does nothing.
pub(crate) fn return_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory under the allocator's
    // own locks; it is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
