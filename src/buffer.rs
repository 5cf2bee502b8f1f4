//! Borrowing the bytes of any bytes-like object without a copy. The stable ABI only exposes the
//! buffer protocol from 3.11, but the two functions have been exported by every CPython 3.x.

use crate::ffi::{PyBuffer_Release, PyObject_GetBuffer, Py_buffer, PYBUF_SIMPLE, PYBUF_WRITABLE};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use std::os::raw::c_int;

/// A held export of a contiguous buffer: while it lives, the exporter cannot resize or free it.
pub struct Bytes {
    view: Box<Py_buffer>,
}

/// A held export of a writable contiguous buffer (what `readinto` fills).
pub struct BytesMut(Bytes);

impl BytesMut {
    pub fn borrow(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Bytes::export(obj, PYBUF_WRITABLE, "a writable bytes-like object").map(BytesMut)
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let view = &self.0.view;
        if view.len <= 0 || view.buf.is_null() {
            return &mut [];
        }
        // SAFETY: the export (held as long as `self`) pins `len` writable bytes at `buf`, checked
        // non-null and positive above; `&mut self` makes this the only slice of them in Rust.
        unsafe { std::slice::from_raw_parts_mut(view.buf.cast::<u8>(), view.len as usize) }
    }
}

impl Bytes {
    pub fn borrow(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::export(obj, PYBUF_SIMPLE, "a bytes-like object")
    }

    fn export(obj: &Bound<'_, PyAny>, flags: c_int, what: &str) -> PyResult<Self> {
        // SAFETY: `Py_buffer` is pointers and integers, for which all-zero is a valid value.
        let mut view = Box::new(unsafe { std::mem::zeroed::<Py_buffer>() });
        // SAFETY: `obj` is a live object and the GIL is held (`Bound`); `view` is a writable
        // `Py_buffer`, released once by `Drop` only if this export succeeds (`Bytes` owns it).
        if unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            let err = PyErr::take(obj.py());
            return Err(PyTypeError::new_err(format!(
                "{what} is required, not '{}'{}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                err.map(|e| format!(" ({e})")).unwrap_or_default()
            )));
        }
        Ok(Bytes { view })
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.view.len <= 0 || self.view.buf.is_null() {
            return &[];
        }
        // SAFETY: the export (held as long as `self`) pins `len` readable bytes at `buf`, checked
        // non-null and positive above; the slice borrows `self`, so it cannot outlive the export.
        unsafe { std::slice::from_raw_parts(self.view.buf.cast::<u8>(), self.view.len as usize) }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        // SAFETY: `view` was filled by a successful `PyObject_GetBuffer` (a `Bytes` exists only
        // then) and is released here once. Releasing touches the exporter's refcount, so it needs
        // the GIL: a `Bytes` is made from a `Bound` (GIL held) and, not being `Send`, cannot be
        // moved into a `py.detach` closure (which must be), so it is dropped with the GIL held.
        unsafe { PyBuffer_Release(&mut *self.view) }
    }
}
