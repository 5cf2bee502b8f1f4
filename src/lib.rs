//! `picklegate._core`: the thin pyo3 layer over `picklegate-core`. It converts types, keeps the
//! process-wide state, registers the audit hook, and raises one Python exception per core error.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod audit;
mod buffer;
mod callsite;
mod errors;
mod ffi;
mod file;
mod interpose;
mod inventory;
mod load;
mod state;
mod tokens;
mod unpickler;

use buffer::Bytes;
use errors::Error;
use picklegate_core::hash::Digest;
use picklegate_core::scan::{Need, Progress, Scanner};
use pyo3::prelude::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The sha256 of a bytes-like object, as 64 hex digits.
#[pyfunction]
fn sha256(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<String> {
    let bytes = Bytes::borrow(data)?;
    let slice = bytes.as_slice();
    Ok(py.detach(|| Digest::of(slice)).to_hex())
}

/// The sha256 of a file's whole content (what `sha256sum` prints).
#[pyfunction]
fn sha256_file(py: Python<'_>, path: std::path::PathBuf) -> Result<String, Error> {
    match py.detach(|| std::fs::File::open(&path).and_then(Digest::of_reader)) {
        Ok(digest) => Ok(digest.to_hex()),
        Err(error) => Err(Error::File { path, error }),
    }
}

/// Reads a pickle from a stream without over-reading: it says how many bytes to read next.
#[pyclass(module = "picklegate._core")]
struct StreamScanner {
    scanner: Scanner,
}

#[pymethods]
impl StreamScanner {
    /// `joblib`: read the stream as `joblib.load` does (raw array bytes after each wrapper).
    #[new]
    #[pyo3(signature = (joblib=false))]
    fn new(joblib: bool) -> Self {
        StreamScanner {
            scanner: if joblib {
                Scanner::for_joblib()
            } else {
                Scanner::default()
            },
        }
    }

    /// Given all bytes read so far: `None` when the pickle is complete, `-1` to read a line,
    /// or the number of bytes to read next.
    fn feed(&mut self, data: &Bound<'_, PyAny>) -> Result<Option<i64>, Error> {
        let bytes = Bytes::borrow(data)?;
        Ok(match self.scanner.feed(bytes.as_slice())? {
            Progress::Done(_) => None,
            Progress::NeedMore(Need::Line) => Some(-1),
            // A hostile length (BINUNICODE8 of 2**64-1) must not wrap to -1, "read a line".
            Progress::NeedMore(Need::Bytes(n)) => Some(i64::try_from(n).unwrap_or(i64::MAX)),
        })
    }

    /// The error for a stream that ended before STOP.
    fn truncated(&self, data: &Bound<'_, PyAny>) -> PyResult<PyErr> {
        let bytes = Bytes::borrow(data)?;
        Ok(Error::Scan(self.scanner.truncation(bytes.as_slice())).into())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    ffi::load()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(sha256, m)?)?;
    m.add_function(wrap_pyfunction!(sha256_file, m)?)?;
    m.add_function(wrap_pyfunction!(state::configure, m)?)?;
    m.add_function(wrap_pyfunction!(state::current_state, m)?)?;
    m.add_function(wrap_pyfunction!(load::guarded_load, m)?)?;
    m.add_function(wrap_pyfunction!(load::guarded_container, m)?)?;
    m.add_function(wrap_pyfunction!(load::refuse_unread, m)?)?;
    m.add_function(wrap_pyfunction!(load::test_refusal, m)?)?;
    m.add_function(wrap_pyfunction!(interpose::redirect_loads, m)?)?;
    m.add_function(wrap_pyfunction!(interpose::redirect_load, m)?)?;
    m.add_function(wrap_pyfunction!(interpose::redirect_unpickler_load, m)?)?;
    m.add_function(wrap_pyfunction!(unpickler::learn_unpickler_layout, m)?)?;
    m.add_function(wrap_pyfunction!(load::set_unpickler_take, m)?)?;
    m.add_function(wrap_pyfunction!(interpose::accept_backstop_only, m)?)?;
    m.add_function(wrap_pyfunction!(interpose::require_full_interposition, m)?)?;
    m.add_function(wrap_pyfunction!(callsite::current_callsite, m)?)?;
    m.add_function(wrap_pyfunction!(audit::install_backstop, m)?)?;
    m.add_function(wrap_pyfunction!(tokens::new_token, m)?)?;
    m.add_function(wrap_pyfunction!(tokens::scope_var, m)?)?;
    m.add_function(wrap_pyfunction!(state::set_observer, m)?)?;
    m.add_function(wrap_pyfunction!(inventory::scan_files, m)?)?;
    m.add_function(wrap_pyfunction!(inventory::freeze_records, m)?)?;
    m.add_function(wrap_pyfunction!(inventory::manifest_entries, m)?)?;
    m.add_function(wrap_pyfunction!(inventory::compile_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(tokens::close_token, m)?)?;
    m.add_class::<tokens::Token>()?;
    m.add_class::<tokens::ScopeObj>()?;
    m.add_class::<StreamScanner>()?;
    m.add_class::<file::HashedFile>()?;
    m.add_class::<file::PinnedFile>()?;
    Ok(())
}
