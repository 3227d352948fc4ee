//! Giving memory back to the system after a burst. relayq's steady state is
//! a few MB; a flood (thousands of sessions, password checks at ~19 MiB
//! each, a 25 MB message) must not leave it at hundreds.
//!
//! glibc's malloc keeps what is freed: it raises its mmap threshold to the
//! largest block freed so far and serves later large blocks from its heaps,
//! which it rarely shrinks, and it returns the freed middle of a heap only
//! when asked. Measured with `relayq-bench --only auth-flood`: without the
//! threshold set, two password checks at a time left 132 MB resident after
//! a 20 s flood; with it, 19 MB. Other allocators (musl) need neither.

/// Large allocations (1 MiB and more) go straight to the kernel and back
/// when freed; setting the threshold also stops glibc moving it. Small
/// allocations are unaffected. Call once at start.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Returns the free pages inside malloc's heaps to the system (after many
/// sessions have closed). Takes milliseconds: call it from a thread of its
/// own, rarely.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
