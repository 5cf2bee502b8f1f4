//! A pickle file read once into private memory and hashed while it is read, then served to the
//! unpickler as a stream that hands back the pages it has consumed. Reading and hashing are one
//! pass (each chunk is hashed while still in cache), the bytes cannot change on disk between the
//! decision and the unpickling (they are a private copy), and the copy shrinks as the unpickled
//! object grows, so a guarded file load peaks near the memory of an unguarded one.

use crate::buffer::BytesMut;
use picklegate_core::hash::{Digest, Hasher};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;

/// Bytes read (and hashed) per step: small enough to still be in cache when hashed.
const READ_CHUNK: usize = 256 << 10;
/// Consumed bytes are given back to the system in steps of at least this much.
const RELEASE_STEP: usize = 8 << 20;

/// A private anonymous mapping: page-aligned, so consumed pages can be given back one by one.
struct Region {
    ptr: *mut u8,
    cap: usize,
}

// The mapping is owned by one `Region`: reads go through `&self`, writes need `&mut self`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(cap: usize) -> io::Result<Self> {
        let cap = cap.max(1);
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), cap, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Huge pages where the system allows them on request: a fault per 4 KiB page costs
        // more than copying that page.
        #[cfg(target_os = "linux")]
        unsafe {
            libc::madvise(ptr, cap, libc::MADV_HUGEPAGE);
        }
        Ok(Region { ptr: ptr as *mut u8, cap })
    }

    fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.cap);
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.end - range.start) }
    }

    fn slice_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.cap);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start) }
    }

    /// Gives the pages of `range` (page-aligned) back; they read as zeros afterwards.
    fn release(&mut self, range: std::ops::Range<usize>) {
        if range.end > range.start {
            unsafe { libc::madvise(self.ptr.add(range.start) as *mut libc::c_void, range.end - range.start, libc::MADV_DONTNEED) };
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.cap) };
    }
}

fn page_size() -> usize {
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize
}

/// Reads `file` from `offset` to its end into a fresh region, hashing each chunk as it lands.
fn read_hashed(file: &File, offset: u64) -> io::Result<(Region, usize, Digest)> {
    let expected = file.metadata()?.len().saturating_sub(offset) as usize;
    // One page more than the file holds, so that reaching the end (a read of 0) needs no growth.
    let mut region = Region::new(expected + page_size())?;
    let mut hasher = Hasher::default();
    let mut len = 0;
    loop {
        if len == region.cap {
            // The file grew while being read: move to a region twice as large.
            let mut bigger = Region::new(region.cap * 2)?;
            bigger.slice_mut(0..len).copy_from_slice(region.slice(0..len));
            region = bigger;
        }
        let end = (len + READ_CHUNK).min(region.cap);
        let n = match file.read_at(region.slice_mut(len..end), offset + len as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(region.slice(len..len + n));
        len += n;
    }
    Ok((region, len, hasher.finish()))
}

/// The rest of a file opened for reading, as the bytes that were hashed: `read`, `readinto`,
/// `readline` and `tell` for the unpickler.
#[pyclass(module = "picklegate._core")]
pub struct HashedFile {
    /// `None` once closed.
    region: Option<Region>,
    len: usize,
    pos: usize,
    released: usize,
    pub sha: Digest,
}

impl HashedFile {
    fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        self.region.as_ref().map_or(&[], |region| region.slice(range))
    }

    /// Everything read from the file, while nothing has been consumed yet.
    pub fn bytes(&self) -> &[u8] {
        self.slice(0..self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn take(&mut self, n: usize) -> std::ops::Range<usize> {
        let start = self.pos;
        self.pos = (self.pos + n).min(self.len);
        start..self.pos
    }

    /// Gives back the whole pages before the read position once a step's worth accumulates.
    fn release_consumed(&mut self) {
        let page = page_size();
        let upto = self.pos / page * page;
        if upto >= self.released + RELEASE_STEP || (self.pos == self.len && upto > self.released) {
            if let Some(region) = &mut self.region {
                region.release(self.released..upto);
            }
            self.released = upto;
        }
    }

    fn remaining(&self, n: Option<isize>) -> usize {
        let left = self.len - self.pos;
        match n {
            Some(n) if n >= 0 => (n as usize).min(left),
            _ => left,
        }
    }
}

#[pymethods]
impl HashedFile {
    /// Reads the file descriptor `fd` from `offset` to the end (without moving its position).
    #[new]
    fn new(py: Python<'_>, fd: i32, offset: u64) -> PyResult<Self> {
        // Borrow the descriptor: its owner (a Python file object) closes it, not us.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let (region, len, sha) = py.detach(|| read_hashed(&file, offset)).map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(HashedFile { region: Some(region), len, pos: 0, released: 0, sha })
    }

    /// Lets go of the memory (an unpickler may outlive its load); reads then find nothing.
    fn close(&mut self) {
        self.region = None;
        self.len = 0;
        self.pos = 0;
    }

    #[pyo3(signature = (n=-1))]
    fn read<'py>(&mut self, py: Python<'py>, n: Option<isize>) -> Bound<'py, PyBytes> {
        let range = self.take(self.remaining(n));
        let out = PyBytes::new(py, self.slice(range));
        self.release_consumed();
        out
    }

    /// Copies into `buffer` in steps, giving back each step's source pages as it goes.
    fn readinto(&mut self, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        let mut target = BytesMut::borrow(buffer)?;
        let target = target.as_mut_slice();
        let total = self.remaining(Some(target.len() as isize));
        let mut done = 0;
        while done < total {
            let range = self.take((total - done).min(RELEASE_STEP));
            let n = range.len();
            target[done..done + n].copy_from_slice(self.slice(range));
            done += n;
            self.release_consumed();
        }
        Ok(total)
    }

    #[pyo3(signature = (size=-1))]
    fn readline<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> Bound<'py, PyBytes> {
        let limit = self.remaining(size);
        let rest = self.slice(self.pos..self.pos + limit);
        let n = rest.iter().position(|&b| b == b'\n').map_or(limit, |i| i + 1);
        self.read(py, Some(n as isize))
    }

    fn tell(&self) -> usize {
        self.pos
    }

    /// The sha256 of the bytes read, as 64 hex digits.
    #[getter]
    fn sha256(&self) -> String {
        self.sha.to_hex()
    }
}
