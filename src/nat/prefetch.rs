//! Cache prefetch hints, so a batch can start the memory loads of packets it will translate a
//! few packets later (see [`super::Translator::translate_batch`]). A hint never changes what
//! a program computes; elsewhere than x86-64 it is a no-op.
#![allow(unsafe_code)]

/// Bytes in a cache line on every x86-64 this runs on.
const LINE: usize = 64;

/// Asks for every cache line of `*value` to be brought into L1.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = (value as *const T).cast::<i8>();
        let size = std::mem::size_of::<T>().max(1);
        // Offsets from `start` of the first byte of each line the value touches.
        let skip = start as usize % LINE;
        let mut off = 0;
        while off < size {
            // SAFETY: PREFETCHT0 is a hint: it never faults, whatever the address, and never
            // changes memory; `wrapping_add` makes the address without claiming it is in
            // bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off)) };
            off += LINE - (skip + off) % LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
