//! Cache prefetch hints, so a batch can start the memory loads of packets it will translate a
//! few packets later (see [`super::Translator::translate_batch`]). A hint never changes what
//! a program computes; elsewhere than x86-64 it is a no-op. The instruction comes from
//! `safe_arch` (a safe wrapper of `PREFETCHT0`), so this crate keeps `unsafe` to the TUN
//! module.

/// Asks for the cache line holding the start of `*value` to be brought into L1. A value that
/// spans lines needs one call per line (see `FlowTable::prefetch_flow`).
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    safe_arch::prefetch_t0(value);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = value;
}
