//! 64-byte aligned, zero-initialised buffers of plain values, kept between calls: the kernels' packed
//! weights and per-thread scratch (one zmm load never straddles two cache lines).

use std::marker::PhantomData;

/// What an [`Aligned`] may hold.
///
/// # Safety
/// Implementors are plain data: every bit pattern is a valid value, zero bits are zero, and their size
/// divides 64.
pub(crate) unsafe trait Plain: Copy + Default + 'static {}
// SAFETY: integers and floats of 1, 2 and 4 bytes are valid for any bits.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for u16 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A buffer of `T` on whole 64-byte lines.
#[derive(Clone, Default)]
pub(crate) struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    const PER_LINE: usize = 64 / std::mem::size_of::<T>();

    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        Aligned { lines: vec![Line([0; 64]); len.div_ceil(Self::PER_LINE)], len, _values: PhantomData }
    }

    /// Makes the buffer `len` values long, reallocating only to grow; the contents are unspecified afterwards.
    pub(crate) fn ensure(&mut self, len: usize) {
        if self.lines.len() * Self::PER_LINE < len {
            *self = Self::zeroed(len);
        }
        self.len = len;
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: `lines` holds `lines.len() * PER_LINE >= len` initialised values (T is plain data, aligned
        // by the 64-byte lines).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
    }

    /// Bytes held, whatever the current length.
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_grows_only() {
        let mut a = Aligned::<u16>::zeroed(33);
        assert_eq!((a.as_slice().len(), a.capacity_bytes()), (33, 128));
        assert!(a.as_slice().iter().all(|&v| v == 0) && a.as_slice().as_ptr() as usize % 64 == 0);
        a.as_mut_slice()[32] = 7;
        a.ensure(10);
        assert_eq!((a.as_slice().len(), a.capacity_bytes()), (10, 128));
        a.ensure(100);
        assert_eq!((a.as_slice().len(), a.capacity_bytes()), (100, 256));
        let f = Aligned::<f32>::zeroed(17);
        assert_eq!((f.as_slice().len(), f.capacity_bytes()), (17, 128));
    }
}
