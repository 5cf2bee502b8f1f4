//! A pickle file read once into private memory and hashed while it is read, then served to the
//! unpickler as a stream that hands back the pages it has consumed. Reading and hashing are one
//! pass (each chunk is hashed while still in cache), the bytes cannot change on disk between the
//! decision and the unpickling (they are a private copy), and the copy shrinks as the unpickled
//! object grows, so a guarded file load peaks near the memory of an unguarded one.

use crate::buffer::BytesMut;
use crate::errors::Error;
use picklegate_core::hash::{Digest, Hasher};
use picklegate_core::scan::{Progress, Scanner};
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

/// A dropped region up to this size is kept for the next region filled whole (a fresh mapping costs
/// a fault and a zeroed page per 4 KiB, as much as hashing them), the way malloc keeps blocks under
/// its largest mmap threshold (32 MiB on 64-bit glibc). Its address and size.
const SPARE_REGION_MAX: usize = 32 << 20;
static SPARE_REGION: parking_lot::Mutex<Option<(usize, usize)>> = parking_lot::Mutex::new(None);

// SAFETY: the mapping belongs to this `Region` alone (nothing else holds `ptr`), like a `Box<[u8]>`:
// moving it to another thread moves the ownership, and `munmap` in `Drop` runs once, wherever.
unsafe impl Send for Region {}
// SAFETY: shared access only reads (`slice` takes `&self`); every write (`slice_mut`, `release`)
// takes `&mut self`, so the borrow checker rules out a write racing a read, as for `[u8]`.
unsafe impl Sync for Region {}

impl Region {
    /// `populate`: the region will be filled whole, so map its pages at once (one call instead of
    /// a fault per page, a third of a guarded load's added time otherwise).
    fn new(cap: usize, populate: bool) -> io::Result<Self> {
        let cap = cap.max(1);
        // Only a region filled whole may reuse one: its earlier bytes are all overwritten before
        // anything reads them (a region with payload holes must read zeros there).
        if populate && cap <= SPARE_REGION_MAX {
            let mut spare = SPARE_REGION.lock();
            if let Some((ptr, spare_cap)) = spare.filter(|&(_, spare_cap)| spare_cap >= cap) {
                *spare = None;
                return Ok(Region {
                    ptr: ptr as *mut u8,
                    cap: spare_cap,
                });
            }
        }
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: an anonymous private mapping at an address of the kernel's choice: no file, no
        // existing memory is touched; failure is MAP_FAILED, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Huge pages where the system allows them on request, for a region filled whole: a fault
        // per 4 KiB page costs more than copying that page. (A region with holes must not get
        // them: a 2 MiB page around a few pinned bytes would stay resident.)
        #[cfg(target_os = "linux")]
        if populate {
            // SAFETY: `ptr..ptr + cap` is the mapping just made; MADV_HUGEPAGE is only a hint and
            // does not change its contents (a failure is harmless and ignored).
            unsafe { libc::madvise(ptr, cap, libc::MADV_HUGEPAGE) };
        }
        Ok(Region {
            ptr: ptr as *mut u8,
            cap,
        })
    }

    fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.cap);
        // SAFETY: the range is inside the mapping (asserted), which lives as long as `self`, is
        // readable and zero-filled where never written; `&self` rules out a concurrent write.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.end - range.start) }
    }

    fn slice_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.cap);
        // SAFETY: the range is inside the mapping (asserted), which is writable and lives as long
        // as `self`; `&mut self` makes this the only slice of it.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
        }
    }

    /// Maps the pages of `range` now, in one call (a hint: on kernels without
    /// `MADV_POPULATE_WRITE` the pages fault in as they are written).
    fn populate(&mut self, range: std::ops::Range<usize>) {
        let page = page_size();
        let (from, upto) = (range.start / page * page, range.end.min(self.cap));
        if upto > from {
            // SAFETY: `from..upto` lies inside the mapping (clamped to `cap`, `from` rounded
            // down inside it); populating only maps zero pages, it does not change the contents.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::madvise(
                    self.ptr.add(from) as *mut libc::c_void,
                    upto - from,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
    }

    /// Gives the pages of `range` (page-aligned) back; they read as zeros afterwards.
    fn release(&mut self, range: std::ops::Range<usize>) {
        assert!(range.end <= self.cap);
        if range.end > range.start {
            // SAFETY: the caller passes a page-aligned range inside the mapping (`&mut self`: no
            // slice of it is borrowed); MADV_DONTNEED on a private anonymous mapping only turns
            // those pages back into zero pages, which `slice` may still read.
            unsafe {
                libc::madvise(
                    self.ptr.add(range.start) as *mut libc::c_void,
                    range.end - range.start,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.cap <= SPARE_REGION_MAX {
            let mut spare = SPARE_REGION.lock();
            if spare.is_none() {
                // Ownership of the mapping moves to the spare slot; `new` hands it out once.
                *spare = Some((self.ptr as usize, self.cap));
                return;
            }
        }
        // SAFETY: `ptr`/`cap` are exactly the mapping made in `new` (or taken whole from the spare
        // slot, which then forgot it), unmapped once, here; no slice of it can outlive `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.cap) };
    }
}

fn page_size() -> usize {
    // SAFETY: `sysconf` only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize
}

/// Reads `file` from `offset` to its end into a fresh region, hashing each chunk as it lands.
fn read_hashed(file: &File, offset: u64) -> io::Result<(Region, usize, Digest)> {
    let expected = file.metadata()?.len().saturating_sub(offset) as usize;
    // One page more than the file holds, so that reaching the end (a read of 0) needs no growth.
    let mut region = Region::new(expected + page_size(), true)?;
    let mut hasher = Hasher::default();
    let mut len = 0;
    loop {
        if len == region.cap {
            // The file grew while being read: move to a region twice as large.
            let mut bigger = Region::new(region.cap * 2, true)?;
            bigger
                .slice_mut(0..len)
                .copy_from_slice(region.slice(0..len));
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

/// A scan that has taken no in-band array payload by this many bytes gives up (its value
/// tracking would cost more than it can save on an opcode-heavy pickle).
const INBAND_SCAN_BUDGET: usize = 8 << 20;
/// A scan tracking more values than this (memo and stack) gives up: the file is kept whole.
const INBAND_SCAN_VALUES: usize = 1 << 17;

/// Reads `file` from `offset` to its end and hashes it, as `read_hashed`, except in-band numpy
/// array payloads (`Scanner::for_inband_arrays`): those are hashed through a scratch buffer and
/// not kept; the returned ranges are read from the file after the check. Their plan is made at
/// each payload's header and proven at STOP; if the proof fails, the file is read again whole
/// (and must hash the same).
fn read_hashed_arrays(
    file: &File,
    offset: u64,
) -> io::Result<(Region, usize, Digest, Vec<std::ops::Range<usize>>)> {
    let expected = file.metadata()?.len().saturating_sub(offset) as usize;
    let page = page_size();
    // Not populated at once: payload pages are never touched. Each chunk is populated before
    // it is read into (one call instead of a fault per page).
    let mut region = Region::new(expected + page, false)?;
    // Allocated at the first payload (most files have none).
    let mut scratch = Vec::new();
    let mut hasher = Hasher::default();
    let mut scanner = Some(Scanner::for_inband_arrays());
    let mut proof: Option<Result<Vec<std::ops::Range<usize>>, String>> = None;
    let mut live: Vec<std::ops::Range<usize>> = Vec::new();
    let mut mark = 0usize;
    let mut len = 0;
    loop {
        if len == region.cap {
            let mut bigger = Region::new(region.cap * 2, false)?;
            bigger
                .slice_mut(0..len)
                .copy_from_slice(region.slice(0..len));
            region = bigger;
        }
        let payload_end = live
            .last()
            .filter(|r| r.start <= len && len < r.end)
            .map(|r| r.end);
        let end = (len + READ_CHUNK)
            .min(region.cap)
            .min(payload_end.unwrap_or(usize::MAX));
        let target = match payload_end {
            Some(_) => {
                scratch.resize(READ_CHUNK, 0);
                &mut scratch[..end - len]
            }
            None => {
                region.populate(len..end);
                region.slice_mut(len..end)
            }
        };
        let n = match file.read_at(target, offset + len as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&target[..n]);
        len += n;
        if let Some(scan) = scanner.as_mut() {
            match scan.feed(region.slice(0..len)) {
                Ok(Progress::Done(report)) => {
                    proof = Some(scan.proven_array_data(&report));
                    scanner = None;
                }
                Ok(Progress::NeedMore(_)) => {
                    if let Some(array) = scan.pending_array() {
                        if live.last().map(|r| r.start) != Some(array.start) {
                            // Give back the payload's pages read so far; the rest of it goes
                            // through the scratch buffer.
                            let from = (array.start.div_ceil(page) * page).max(mark);
                            let upto = array.end.min(region.cap) / page * page;
                            if upto > from {
                                region.release(from..upto);
                                mark = upto;
                            }
                            live.push(array);
                        }
                    } else if scan.tracked_values() > INBAND_SCAN_VALUES
                        || (live.is_empty() && len > INBAND_SCAN_BUDGET)
                    {
                        proof = Some(Err("the scan gave up".to_string()));
                        scanner = None;
                    }
                }
                Err(e) => {
                    proof = Some(Err(e.to_string()));
                    scanner = None;
                }
            }
        }
    }
    let sha = hasher.finish();
    let proven = match &proof {
        Some(Ok(ranges)) => live.iter().all(|r| r.end <= len && ranges.contains(r)),
        _ => false,
    };
    if !live.is_empty() && !proven {
        // The provisional plan does not hold: keep everything (read again, same hash).
        let (region, whole_len, whole_sha) = read_hashed(file, offset)?;
        if whole_sha != sha {
            return Err(io::Error::other(
                "the file changed while it was being read for its sha256",
            ));
        }
        return Ok((region, whole_len, sha, Vec::new()));
    }
    Ok((region, len, sha, live))
}

/// The rest of a file opened for reading, as the bytes that were hashed: `read`, `readinto`,
/// `readline`, `seek` and `tell` for the unpickler. In-band numpy array payloads proven to be data
/// are not held: they are read from the file at their hashed offset when the unpickler asks for
/// them (into its own buffer with `readinto`); every other byte is served from private memory.
/// A seek back (pandas' fallback unpickler reads the file again) serves the bytes still held, or
/// reads the file whole again, which must hash the same: never unproven bytes.
#[pyclass(module = "picklegate._core")]
pub struct HashedFile {
    /// `None` once closed.
    region: Option<Region>,
    len: usize,
    pos: usize,
    released: usize,
    pub sha: Digest,
    /// The file (a duplicate descriptor, `None` once closed) and where the hashed bytes start.
    file: Option<File>,
    offset: u64,
    /// Sorted, disjoint ranges (from `offset`) read from the file, not from `region`.
    live: Vec<std::ops::Range<usize>>,
}

impl HashedFile {
    fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        match &self.region {
            Some(region) if range.start < range.end => region.slice(range),
            _ => &[],
        }
    }

    /// Everything read from the file (array payloads read as zeros), while nothing has been
    /// consumed yet: what the decision scans.
    pub fn bytes(&self) -> &[u8] {
        self.slice(0..self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether some bytes will be read from the file after the check.
    pub fn has_live(&self) -> bool {
        !self.live.is_empty()
    }

    /// Gives up the array plan: reads the file whole into private memory again, which must hash
    /// the same (for an unpickler the proof does not cover: a reused one, whose memo it cannot
    /// follow, or one with its own `find_class`).
    pub fn keep_whole(&mut self) -> Result<(), Error> {
        if self.live.is_empty() {
            return Ok(());
        }
        self.hold_whole()
    }

    /// Makes every hashed byte private memory again (array payloads, pages given back): the file
    /// read whole, which must hash the same; nothing to do while they are all still held.
    fn hold_whole(&mut self) -> Result<(), Error> {
        if self.live.is_empty() && self.released == 0 && self.region.is_some() {
            return Ok(());
        }
        let Some(file) = self.file.as_ref() else {
            return Err(closed_file());
        };
        let (region, len, sha) = read_hashed(file, self.offset)?;
        if sha != self.sha {
            return Err(io::Error::other("the file changed after its check").into());
        }
        (self.region, self.len, self.released) = (Some(region), len, 0);
        self.live.clear();
        Ok(())
    }

    /// Gives back the whole pages before the read position once a step's worth accumulates.
    fn release_consumed(&mut self) {
        let page = page_size();
        let upto = self.pos.min(self.len) / page * page;
        if upto >= self.released + RELEASE_STEP || (self.pos == self.len && upto > self.released) {
            if let Some(region) = &mut self.region {
                region.release(self.released..upto);
            }
            self.released = upto;
        }
    }

    fn remaining(&self, n: Option<isize>) -> usize {
        let left = self.len.saturating_sub(self.pos);
        match n {
            Some(n) if n >= 0 => (n as usize).min(left),
            _ => left,
        }
    }

    /// Whether `pos..pos + n` touches a range read from the file.
    fn touches_live(&self, n: usize) -> bool {
        let i = self.live.partition_point(|r| r.end <= self.pos);
        self.live.get(i).is_some_and(|r| r.start < self.pos + n)
    }

    /// Copies the next `out.len()` bytes (at most `remaining`) into `out` and moves past them,
    /// private bytes from memory, array payloads from the file. A file cut short after the check
    /// ends the stream where the file now ends, as the unguarded read would find it.
    fn fill(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let total = out.len().min(self.len.saturating_sub(self.pos));
        let mut done = 0;
        while done < total {
            let at = self.pos;
            let i = self.live.partition_point(|r| r.end <= at);
            let (upto, from_file) = match self.live.get(i) {
                Some(r) if r.start <= at => (r.end.min(at + total - done), true),
                Some(r) => (r.start.min(at + total - done).min(at + RELEASE_STEP), false),
                None => ((at + total - done).min(at + RELEASE_STEP), false),
            };
            let target = &mut out[done..done + (upto - at)];
            if from_file {
                let file = self
                    .file
                    .as_ref()
                    .expect("live ranges come with their file");
                let mut got = 0;
                while got < target.len() {
                    match file.read_at(&mut target[got..], self.offset + (at + got) as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                self.pos += got;
                done += got;
                if got < target.len() {
                    // Truncated after the check: the stream ends here, as the file does.
                    self.len = self.pos;
                    break;
                }
            } else {
                target.copy_from_slice(self.slice(at..upto));
                self.pos = upto;
                done += upto - at;
                self.release_consumed();
            }
        }
        Ok(done)
    }
}

#[pymethods]
impl HashedFile {
    /// Reads the file descriptor `fd` from `offset` to the end (without moving its position).
    #[new]
    fn new(py: Python<'_>, fd: i32, offset: u64) -> Result<Self, Error> {
        // Borrow the descriptor to duplicate it: its owner (a Python file object) closes it.
        // SAFETY: `ManuallyDrop` never closes `fd`, so the `File` only borrows it, for this call,
        // while the Python caller keeps its file object (and so the descriptor) open.
        let borrowed = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let file = borrowed.try_clone()?;
        let (region, len, sha, live) = py.detach(|| read_hashed_arrays(&file, offset))?;
        Ok(HashedFile {
            region: Some(region),
            len,
            pos: 0,
            released: 0,
            sha,
            file: Some(file),
            offset,
            live,
        })
    }

    /// Lets go of the memory (an unpickler may outlive its load); reads then find nothing.
    fn close(&mut self) {
        self.region = None;
        self.file = None;
        self.live.clear();
        self.len = 0;
        self.pos = 0;
    }

    #[pyo3(signature = (n=-1))]
    fn read<'py>(
        &mut self,
        py: Python<'py>,
        n: Option<isize>,
    ) -> Result<Bound<'py, PyBytes>, Error> {
        let n = self.remaining(n);
        if !self.touches_live(n) {
            let start = self.pos;
            self.pos += n;
            let out = PyBytes::new(py, self.slice(start..self.pos));
            self.release_consumed();
            return Ok(out);
        }
        let mut out = vec![0u8; n];
        let got = py.detach(|| self.fill(&mut out))?;
        Ok(PyBytes::new(py, &out[..got]))
    }

    /// Fills `buffer`: private bytes copied in steps (each step's source pages given back), an
    /// array payload read from the file straight into it.
    fn readinto(&mut self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> Result<usize, Error> {
        let mut target = BytesMut::borrow(buffer)?;
        let target = target.as_mut_slice();
        if !self.touches_live(target.len()) {
            return Ok(self.fill(target)?);
        }
        Ok(py.detach(|| self.fill(target))?)
    }

    #[pyo3(signature = (size=-1))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> Result<Bound<'py, PyBytes>, Error> {
        let limit = self.remaining(size);
        if !self.touches_live(limit) {
            let rest = self.slice(self.pos..self.pos + limit);
            let n = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(limit, |i| i + 1);
            return self.read(py, Some(n as isize));
        }
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < limit && self.fill(&mut byte)? == 1 {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        Ok(PyBytes::new(py, &line))
    }

    fn tell(&self) -> usize {
        self.pos
    }

    /// Moves to `offset` (from the start of the hashed bytes, the position, or their end). Pages
    /// before the position may have been given back, and array payloads are read from the file
    /// (proven for one pass of a standard unpickler, not for whoever reads next): a move back
    /// over given-back pages, or any move with array payloads planned, reads the file whole again
    /// and requires the same sha256 (else `OSError`); the next reader reads only hashed bytes.
    #[pyo3(signature = (offset, whence=0))]
    fn seek(&mut self, py: Python<'_>, offset: i64, whence: i32) -> Result<usize, Error> {
        if self.region.is_none() {
            return Err(closed_file());
        }
        let base = match whence {
            0 => 0,
            1 => self.pos as i64,
            2 => self.len as i64,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "invalid whence ({whence}, should be 0, 1 or 2)"
                ))
                .into())
            }
        };
        let Some(target) = base.checked_add(offset).filter(|&t| t >= 0) else {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "negative seek position {offset}"
            ))
            .into());
        };
        let target = target as usize;
        if target != self.pos && (!self.live.is_empty() || target < self.released) {
            py.detach(|| self.hold_whole())?;
        }
        self.pos = target;
        Ok(self.pos)
    }

    fn seekable(&self) -> bool {
        true
    }

    /// The sha256 of the bytes read, as 64 hex digits.
    #[getter]
    fn sha256(&self) -> String {
        self.sha.to_hex()
    }

    /// How many bytes are read from the file after the check instead of private memory.
    #[getter]
    fn live_bytes(&self) -> usize {
        self.live.iter().map(|r| r.len()).sum()
    }
}

fn closed_file() -> Error {
    pyo3::exceptions::PyValueError::new_err("I/O operation on closed file.").into()
}

/// Which bytes of a pinned file may be served from the file itself after the check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Everything is kept in private memory.
    Whole,
    /// A joblib pickle: the raw bytes of numeric arrays after each NumpyArrayWrapper (as the
    /// joblib scanner sizes them) are read from the file; the pickle opcodes are private.
    Joblib,
    /// A torch zip checkpoint: the storages' raw bytes (`<archive>/data/<key>`, stored) are read
    /// from the file; every other byte (records, pickles, headers, directory) is private.
    TorchZip,
}

fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The zip64 extended sizes/offset that replace the 32-bit fields set to 0xFFFFFFFF, in order.
fn zip64_fields(extra: &[u8], wanted: &[bool]) -> Option<Vec<u64>> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let (id, size) = (le16(extra, at), le16(extra, at + 2) as usize);
        let body = extra.get(at + 4..at + 4 + size)?;
        if id == 1 {
            let mut values = Vec::new();
            let mut off = 0;
            for &w in wanted {
                if w {
                    values.push(le64(body.get(off..off + 8)?, 0));
                    off += 8;
                }
            }
            return Some(values);
        }
        at += 4 + size;
    }
    None
}

/// One member as the central directory names it.
struct Member {
    header: usize,
    name: Vec<u8>,
    method: u64,
    size: u64,
    uncompressed: u64,
}

fn is_storage(name: &[u8]) -> bool {
    let parts: Vec<&[u8]> = name.split(|&b| b == b'/').collect();
    parts.len() == 3
        && parts[1] == b"data"
        && !parts[2].is_empty()
        && parts[2].iter().all(u8::is_ascii_digit)
}

/// The directory a zip reader will use, read before the hash pass (torch writes sizes only in the
/// directory and data descriptors, so the local headers alone cannot be walked). The pass then
/// checks that the bytes it hashed there are these same bytes.
struct ZipPlan {
    /// Where the central directory starts; everything from here to the end is `directory`.
    start: usize,
    directory: Vec<u8>,
    /// Sorted by header offset.
    members: Vec<Member>,
    /// The next member whose local header the pass has not reached yet.
    next: usize,
    /// The end of the last member's data: members must not overlap.
    floor: usize,
    /// Something did not match: the pass keeps everything.
    broken: bool,
}

/// A central directory larger than this is not planned: the file is then kept whole.
const MAX_DIRECTORY: usize = 64 << 20;

impl ZipPlan {
    fn read(file: &File, size: usize) -> Option<Self> {
        let tail_len = size.min(22 + 65535);
        let mut tail = vec![0u8; tail_len];
        file.read_exact_at(&mut tail, (size - tail_len) as u64)
            .ok()?;
        let eocd = (0..=tail_len.checked_sub(22)?)
            .rev()
            .find(|&i| &tail[i..i + 4] == b"PK\x05\x06")?;
        let (mut count, mut offset) = (le16(&tail, eocd + 10), le32(&tail, eocd + 16));
        if offset == 0xFFFF_FFFF || count == 0xFFFF {
            let locator = eocd
                .checked_sub(20)
                .filter(|&l| &tail[l..l + 4] == b"PK\x06\x07")?;
            let mut record = [0u8; 56];
            file.read_exact_at(&mut record, le64(&tail, locator + 8))
                .ok()?;
            if &record[..4] != b"PK\x06\x06" {
                return None;
            }
            (count, offset) = (le64(&record, 32), le64(&record, 48));
        }
        let start = usize::try_from(offset)
            .ok()
            .filter(|&o| o <= size && size - o <= MAX_DIRECTORY)?;
        let mut directory = vec![0u8; size - start];
        file.read_exact_at(&mut directory, start as u64).ok()?;
        let mut members = Vec::new();
        let mut at = 0;
        for _ in 0..count {
            let c = directory
                .get(at..at + 46)
                .filter(|c| &c[..4] == b"PK\x01\x02")?;
            let (method, mut csize, mut usize_, mut local) =
                (le16(c, 10), le32(c, 20), le32(c, 24), le32(c, 42));
            let (n, m, k) = (
                le16(c, 28) as usize,
                le16(c, 30) as usize,
                le16(c, 32) as usize,
            );
            let name = directory.get(at + 46..at + 46 + n)?.to_vec();
            let extra = directory.get(at + 46 + n..at + 46 + n + m)?;
            let wanted = [
                usize_ == 0xFFFF_FFFF,
                csize == 0xFFFF_FFFF,
                local == 0xFFFF_FFFF,
            ];
            if wanted.iter().any(|&w| w) {
                let mut values = zip64_fields(extra, &wanted)?.into_iter();
                if wanted[0] {
                    usize_ = values.next()?;
                }
                if wanted[1] {
                    csize = values.next()?;
                }
                if wanted[2] {
                    local = values.next()?;
                }
            }
            members.push(Member {
                header: usize::try_from(local).ok()?,
                name,
                method,
                size: csize,
                uncompressed: usize_,
            });
            at += 46 + n + m + k;
        }
        members.sort_by_key(|m| m.header);
        Some(ZipPlan {
            start,
            directory,
            members,
            next: 0,
            floor: 0,
            broken: false,
        })
    }

    /// Reads the local headers now wholly in `bytes[..len]`; returns the new payload ranges.
    fn advance(&mut self, bytes: &[u8], len: usize, out: &mut Vec<std::ops::Range<usize>>) {
        while let Some(member) = self.members.get(self.next).filter(|_| !self.broken) {
            let at = member.header;
            if at + 30 > len {
                return;
            }
            let h = &bytes[at..];
            let (n, m) = (le16(h, 26) as usize, le16(h, 28) as usize);
            if at + 30 + n + m > len {
                return;
            }
            let data = at + 30 + n + m;
            let end = usize::try_from(member.size)
                .ok()
                .and_then(|s| data.checked_add(s));
            match end {
                Some(end)
                    if &h[..4] == b"PK\x03\x04"
                        && h[30..30 + n] == member.name[..]
                        && at >= self.floor
                        && end <= self.start =>
                {
                    if member.method == 0
                        && member.size == member.uncompressed
                        && is_storage(&member.name)
                        && end > data
                    {
                        out.push(data..end);
                    }
                    self.floor = end;
                    self.next += 1;
                }
                _ => self.broken = true,
            }
        }
    }

    /// Whether the pass hashed exactly the directory the plan was made from, and every member.
    fn held(&self, hashed: &[u8]) -> bool {
        !self.broken
            && self.next == self.members.len()
            && hashed.len() == self.start + self.directory.len()
            && hashed[self.start..] == self.directory[..]
    }
}

/// A file read once and hashed while read: the bytes the check saw stay in private memory,
/// except (by layout) raw tensor payloads, which later reads take from the file itself.
pub struct Pinned {
    file: File,
    region: Region,
    len: usize,
    /// Sorted, disjoint ranges served from the file, not from `region`.
    live: Vec<std::ops::Range<usize>>,
    pub sha: Digest,
    /// The last block read ahead from the file for small reads of `live` ranges (a torch zip of
    /// many small tensors): its start and bytes. Only ever serves bytes of `live` ranges.
    window: parking_lot::Mutex<(usize, Vec<u8>)>,
}

/// Reads of `live` bytes smaller than this go through the read-ahead window of `WINDOW` bytes.
const WINDOWED_READ: usize = 16 << 10;
const WINDOW: usize = 128 << 10;

impl Pinned {
    fn read(file: File, layout: Layout) -> io::Result<Self> {
        let expected = file.metadata()?.len() as usize;
        // A small file is kept whole: its payloads would cost more to plan and read again than to
        // hold, and its region can be the spare one.
        let layout = if expected < SPARE_REGION_MAX {
            Layout::Whole
        } else {
            layout
        };
        let page = page_size();
        let mut region = Region::new(expected + page, layout == Layout::Whole)?;
        let mut scratch = vec![
            0u8;
            if layout == Layout::Whole {
                0
            } else {
                READ_CHUNK
            }
        ];
        let mut hasher = Hasher::default();
        let mut plan = if layout == Layout::TorchZip {
            ZipPlan::read(&file, expected)
        } else {
            None
        };
        let mut joblib = (layout == Layout::Joblib).then(Scanner::for_joblib);
        // The joblib scan reached STOP (`Some(true)`) or failed (`Some(false)`).
        let mut joblib_end: Option<bool> = None;
        let mut live = Vec::new();
        // Payload ranges from `open` on are not yet wholly given back; `mark`: released up to here.
        let (mut open, mut mark) = (0usize, 0usize);
        let mut len = 0;
        loop {
            if len == region.cap {
                let mut bigger = Region::new(region.cap * 2, layout == Layout::Whole)?;
                bigger
                    .slice_mut(0..len)
                    .copy_from_slice(region.slice(0..len));
                region = bigger;
            }
            // Inside a payload already found, read through a scratch buffer: its pages are
            // never touched (no fault, nothing to give back).
            let payload_end = live
                .last()
                .filter(|r: &&std::ops::Range<usize>| r.start <= len && len < r.end)
                .map(|r| r.end);
            let end = (len + READ_CHUNK)
                .min(region.cap)
                .min(payload_end.unwrap_or(usize::MAX));
            let target = match payload_end {
                Some(_) => &mut scratch[..end - len],
                None => region.slice_mut(len..end),
            };
            let n = match file.read_at(target, len as u64) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            hasher.update(&target[..n]);
            len += n;
            if let (Some(scanner), None) = (joblib.as_mut(), joblib_end) {
                match scanner.feed(region.slice(0..len)) {
                    // A dtype the scan could not follow to the end: keep the file whole.
                    Ok(Progress::Done(_)) => {
                        joblib_end = Some(scanner.raw_arrays_unsound().is_none())
                    }
                    Ok(Progress::NeedMore(_)) => {
                        if let Some(array) = scanner.pending_array() {
                            if live.last().map(|r: &std::ops::Range<usize>| r.start)
                                != Some(array.start)
                            {
                                live.push(array);
                            }
                        }
                    }
                    Err(_) => joblib_end = Some(false),
                }
            }
            if let Some(plan) = plan.as_mut() {
                plan.advance(region.slice(0..region.cap), len, &mut live);
            }
            if layout != Layout::Whole {
                // Give back a payload's pages as soon as it is found (the rest of it is hashed
                // through the scratch buffer): it will be read from the file.
                while let Some(range) = live.get(open) {
                    let from = (range.start.div_ceil(page) * page).max(mark);
                    let upto = range.end / page * page;
                    if upto > from {
                        region.release(from..upto);
                        mark = upto;
                    }
                    open += 1;
                }
            }
        }
        let sha = hasher.finish();
        let planned = match layout {
            Layout::TorchZip => plan.as_ref().is_some_and(|p| p.held(region.slice(0..len))),
            Layout::Joblib => joblib_end == Some(true) && live.last().is_none_or(|r| r.end <= len),
            Layout::Whole => true,
        };
        if !live.is_empty() && !planned {
            // The directory does not match the walk: keep everything (read again, same hash).
            let whole = Pinned::read(file, Layout::Whole)?;
            if whole.sha != sha {
                return Err(io::Error::other(
                    "the file changed while it was being read for its sha256",
                ));
            }
            return Ok(whole);
        }
        Ok(Pinned {
            file,
            region,
            len,
            live,
            sha,
            window: parking_lot::Mutex::new((0, Vec::new())),
        })
    }

    /// The private bytes (payload ranges read as zeros): what the scan of the decision reads.
    pub fn private_bytes(&self) -> &[u8] {
        self.region.slice(0..self.len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Fills `target` with the file's bytes at `at` from the read-ahead window, reading a new
    /// window there if needed; `false` when the file ends before `target` does (read it directly).
    fn read_windowed(&self, at: usize, target: &mut [u8]) -> io::Result<bool> {
        let mut window = self.window.lock();
        let (start, bytes) = &mut *window;
        if !(*start <= at && at + target.len() <= *start + bytes.len()) {
            bytes.resize(WINDOW.min(self.len - at), 0);
            let mut got = 0;
            while got < bytes.len() {
                match self.file.read_at(&mut bytes[got..], (at + got) as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            bytes.truncate(got);
            *start = at;
            if got < target.len() {
                return Ok(false);
            }
        }
        let from = at - *start;
        target.copy_from_slice(&bytes[from..from + target.len()]);
        Ok(true)
    }

    /// Copies the bytes at `pos..pos + out.len()` (clamped to the file) into `out`.
    fn read_at(&self, pos: usize, out: &mut [u8]) -> io::Result<usize> {
        let end = (pos + out.len()).min(self.len);
        let mut at = pos;
        while at < end {
            let i = self.live.partition_point(|r| r.end <= at);
            let (upto, from_file) = match self.live.get(i) {
                Some(r) if r.start <= at => (r.end.min(end), true),
                Some(r) => (r.start.min(end), false),
                None => (end, false),
            };
            let target = &mut out[at - pos..upto - pos];
            if !from_file {
                target.copy_from_slice(self.region.slice(at..upto));
            } else if target.len() >= WINDOWED_READ || !self.read_windowed(at, target)? {
                let mut done = 0;
                while done < target.len() {
                    match self.file.read_at(&mut target[done..], (at + done) as u64) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file was truncated after its check",
                            ))
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            at = upto;
        }
        Ok(end.saturating_sub(pos))
    }
}

/// A read-only file object over a `Pinned` file, handed to a loader library in place of the file
/// it opens: `read`, `readinto`, `readline`, `peek`, `seek`, `tell`, a context manager.
#[pyclass(module = "picklegate._core")]
pub struct PinnedFile {
    pub pinned: std::sync::Arc<Pinned>,
    pos: usize,
    closed: bool,
    #[pyo3(get, set)]
    name: Option<Py<PyAny>>,
}

impl PinnedFile {
    fn check_open(&self) -> PyResult<()> {
        if self.closed {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "I/O operation on closed file.",
            ));
        }
        Ok(())
    }

    fn take(&mut self, py: Python<'_>, n: Option<isize>) -> Result<Vec<u8>, Error> {
        self.check_open()?;
        let left = self.pinned.len.saturating_sub(self.pos);
        let n = match n {
            Some(n) if n >= 0 => (n as usize).min(left),
            _ => left,
        };
        let mut out = vec![0u8; n];
        let pinned = self.pinned.clone();
        let pos = self.pos;
        let got = py.detach(|| pinned.read_at(pos, &mut out))?;
        out.truncate(got);
        Ok(out)
    }
}

#[pymethods]
impl PinnedFile {
    /// Reads the whole file open at descriptor `fd` (duplicated; the caller keeps its own) and
    /// hashes it. `layout` is `"whole"` or `"torch-zip"`.
    #[new]
    #[pyo3(signature = (fd, layout, name=None))]
    fn new(py: Python<'_>, fd: i32, layout: &str, name: Option<Py<PyAny>>) -> Result<Self, Error> {
        let layout = match layout {
            "whole" => Layout::Whole,
            "torch-zip" => Layout::TorchZip,
            "joblib" => Layout::Joblib,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown layout {other:?}"
                ))
                .into())
            }
        };
        // SAFETY: `ManuallyDrop` never closes `fd`, so the `File` only borrows it, for this call,
        // while the Python caller keeps its file object (and so the descriptor) open.
        let borrowed = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let file = borrowed.try_clone()?;
        let pinned = py.detach(|| Pinned::read(file, layout))?;
        Ok(PinnedFile {
            pinned: std::sync::Arc::new(pinned),
            pos: 0,
            closed: false,
            name,
        })
    }

    /// Another file object over the same checked bytes, at position 0.
    fn reopen(&self, py: Python<'_>) -> Self {
        PinnedFile {
            pinned: self.pinned.clone(),
            pos: 0,
            closed: false,
            name: self.name.as_ref().map(|n| n.clone_ref(py)),
        }
    }

    #[getter]
    fn sha256(&self) -> String {
        self.pinned.sha.to_hex()
    }

    /// How many bytes are read from the file after the check instead of private memory.
    #[getter]
    fn live_bytes(&self) -> usize {
        self.pinned.live.iter().map(|r| r.len()).sum()
    }

    #[getter]
    fn size(&self) -> usize {
        self.pinned.len
    }

    #[getter]
    fn mode(&self) -> &'static str {
        "rb"
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed
    }

    fn close(&mut self) {
        self.closed = true;
    }

    fn readable(&self) -> PyResult<bool> {
        self.check_open().map(|_| true)
    }

    fn seekable(&self) -> PyResult<bool> {
        self.check_open().map(|_| true)
    }

    fn writable(&self) -> bool {
        false
    }

    fn isatty(&self) -> bool {
        false
    }

    fn flush(&self) {}

    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        let unsupported = py.import("io")?.getattr("UnsupportedOperation")?;
        Err(PyErr::from_value(unsupported.call1(("fileno",))?))
    }

    #[pyo3(signature = (n=-1))]
    fn read<'py>(&mut self, py: Python<'py>, n: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        self.check_open()?;
        let left = self.pinned.len.saturating_sub(self.pos);
        let n = match n {
            Some(n) if n >= 0 => (n as usize).min(left),
            _ => left,
        };
        let (pinned, pos) = (self.pinned.clone(), self.pos);
        // Straight into the bytes object: no intermediate buffer.
        let out = PyBytes::new_with(py, n, |buffer| {
            let got = pinned.read_at(pos, buffer).map_err(Error::Io)?;
            if got != n {
                return Err(PyOSError::new_err("the file was truncated after its check"));
            }
            Ok(())
        })?;
        self.pos += n;
        Ok(out)
    }

    #[pyo3(signature = (n=-1))]
    fn read1<'py>(&mut self, py: Python<'py>, n: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        self.read(py, n)
    }

    /// The next bytes without moving (at least one byte unless at the end), as `BufferedReader`.
    #[pyo3(signature = (n=0))]
    fn peek<'py>(&mut self, py: Python<'py>, n: isize) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.take(py, Some(n.max(1)))?;
        Ok(PyBytes::new(py, &out))
    }

    fn readinto(&mut self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> Result<usize, Error> {
        self.check_open()?;
        let mut target = BytesMut::borrow(buffer)?;
        let target = target.as_mut_slice();
        let pinned = self.pinned.clone();
        let pos = self.pos;
        let got = py.detach(|| pinned.read_at(pos, target))?;
        self.pos += got;
        Ok(got)
    }

    #[pyo3(signature = (size=-1))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> Result<Bound<'py, PyBytes>, Error> {
        self.check_open()?;
        let mut line = Vec::new();
        let limit = match size {
            Some(s) if s >= 0 => s as usize,
            _ => usize::MAX,
        };
        while line.len() < limit && self.pos < self.pinned.len {
            let mut chunk = vec![
                0u8;
                (limit - line.len())
                    .min(8192)
                    .min(self.pinned.len - self.pos)
            ];
            let got = self.pinned.read_at(self.pos, &mut chunk)?;
            let used = chunk[..got]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(got, |i| i + 1);
            line.extend_from_slice(&chunk[..used]);
            self.pos += used;
            if used < got || got == 0 || line.last() == Some(&b'\n') {
                break;
            }
        }
        Ok(PyBytes::new(py, &line))
    }

    #[pyo3(signature = (offset, whence=0))]
    fn seek(&mut self, offset: i64, whence: i32) -> PyResult<usize> {
        self.check_open()?;
        let base = match whence {
            0 => 0,
            1 => self.pos as i64,
            2 => self.pinned.len as i64,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "invalid whence ({whence}, should be 0, 1 or 2)"
                )))
            }
        };
        let target = base.checked_add(offset).filter(|&t| t >= 0);
        let Some(target) = target else {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "negative seek position {offset}"
            )));
        };
        self.pos = target as usize;
        Ok(self.pos)
    }

    fn tell(&self) -> PyResult<usize> {
        self.check_open().map(|_| self.pos)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        slf.check_open()?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.closed = true;
        false
    }
}
