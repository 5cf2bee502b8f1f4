//! Borrowing the bytes of any bytes-like object without a copy. The stable ABI only exposes the
//! buffer protocol from 3.11, but the two functions have been exported by every CPython 3.x.

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::os::raw::{c_char, c_int, c_void};

#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

use crate::capi::{PyBuffer_Release, PyObject_GetBuffer};

const PYBUF_SIMPLE: c_int = 0;
const PYBUF_WRITABLE: c_int = 0x0001;

/// A held export of a contiguous buffer: while it lives, the exporter cannot resize or free it.
pub struct Bytes {
    view: Box<RawBuffer>,
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
        unsafe { std::slice::from_raw_parts_mut(view.buf as *mut u8, view.len as usize) }
    }
}

// The export pins the memory, so the slice may be read with the GIL released.
unsafe impl Send for Bytes {}
unsafe impl Sync for Bytes {}

impl Bytes {
    pub fn borrow(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::export(obj, PYBUF_SIMPLE, "a bytes-like object")
    }

    fn export(obj: &Bound<'_, PyAny>, flags: c_int, what: &str) -> PyResult<Self> {
        let mut view = Box::new(unsafe { std::mem::zeroed::<RawBuffer>() });
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
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, self.view.len as usize) }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        // Releasing touches the exporter's refcount: it needs the GIL, which every caller holds
        // again by the time a `Bytes` goes out of scope.
        unsafe { PyBuffer_Release(&mut *self.view) }
    }
}
