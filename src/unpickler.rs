//! A live `_pickle.Unpickler` reads its file through four fields (read, readinto, readline, peek);
//! for one load they are pointed at the judged bytes, so the object itself (memo, marks, reuse) runs them.

use crate::ffi::word;
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::sync::OnceLock;

/// Byte offsets of the fields in CPython's `UnpicklerObject`, learnt once by `learn_unpickler_layout`.
#[derive(Debug)]
struct Layout {
    /// `read`, `readinto`, `readline`, `peek`.
    methods: [usize; 4],
    /// `input_len`, `next_read_idx`, `prefetched_idx`: the three words just before `read`, or
    /// just before `frame` where there is one.
    counters: [usize; 3],
    /// `frame_end`, `saved_input_len`: between `prefetched_idx` and `read` from CPython 3.13.15 and
    /// 3.14.7 on (the FRAME fix); -1 and 0 between loads.
    frame: Option<[usize; 2]>,
}

/// `frame_end` and `saved_input_len` between loads.
const FRAME_AT_REST: [usize; 2] = [usize::MAX, 0];

static LAYOUT: OnceLock<Layout> = OnceLock::new();
/// Why the probe did not find the layout, for the message of the redirect that then cannot be made.
static UNKNOWN: parking_lot::Mutex<Option<String>> = parking_lot::Mutex::new(None);

const WORD: usize = std::mem::size_of::<usize>();

/// Where the word at byte `offset` of an unpickler is (see `ffi::word` for what a read needs).
fn field(unpickler: &Bound<'_, PyAny>, offset: usize) -> *mut usize {
    word(unpickler.as_ptr(), offset)
}

/// Finds the fields by value, not by a table per CPython version. `fresh` was made over a file
/// whose `read`, `readinto`, `readline`, `peek` are the four distinct `methods`; `loaded` was made
/// over a file with only `read` and `readline`, whose first `read` returned `served` bytes, of which
/// one load consumed `consumed`. Each method must sit in exactly one word of `fresh`, and `loaded`
/// must show the counters `_pickle.c` leaves after that load. Anything else: the layout is unknown.
#[pyfunction]
pub fn learn_unpickler_layout(
    fresh: &Bound<'_, PyAny>,
    methods: [Bound<'_, PyAny>; 4],
    loaded: &Bound<'_, PyAny>,
    served: usize,
    consumed: usize,
) -> PyResult<()> {
    let size: usize = fresh.get_type().getattr("__basicsize__")?.extract()?;
    let unknown = |why: String| {
        let message = format!("_pickle.Unpickler has a layout picklegate does not know: {why}");
        *UNKNOWN.lock() = Some(message.clone());
        PyRuntimeError::new_err(message)
    };
    if !loaded.get_type().is(fresh.get_type()) {
        return Err(unknown("the probes are of different classes".into()));
    }
    // Both probes are of the same class, so the first `__basicsize__` bytes of each are theirs.
    let words = |obj: &Bound<'_, PyAny>| -> Vec<usize> {
        (0..size / WORD)
            // SAFETY: a word-aligned offset below `__basicsize__` of a live object (`Bound`),
            // read with the GIL held; any bit pattern is a valid `usize`.
            .map(|i| unsafe { *field(obj, i * WORD) })
            .collect()
    };
    let wanted = [0, 1, 2, 3].map(|i| methods[i].as_ptr() as usize);
    let layout =
        find_layout(&words(fresh), wanted, &words(loaded), served, consumed).map_err(unknown)?;
    let _ = LAYOUT.set(layout);
    Ok(())
}

/// The layout read off the words of the two probes of `learn_unpickler_layout`, or why not.
fn find_layout(
    fresh: &[usize],
    methods: [usize; 4],
    loaded: &[usize],
    served: usize,
    consumed: usize,
) -> Result<Layout, String> {
    let at = |words: &[usize], off: usize| words[off / WORD];
    let mut offsets = [0usize; 4];
    for (slot, wanted) in offsets.iter_mut().zip(methods) {
        let found: Vec<usize> = (0..fresh.len())
            .map(|i| i * WORD)
            .filter(|&off| at(fresh, off) == wanted)
            .collect();
        match found.as_slice() {
            [off] => *slot = *off,
            _ => return Err(format!("a file method was found in {} places", found.len())),
        }
    }
    let read = offsets[0];
    if read < 3 * WORD {
        return Err("no room for the input counters before read".into());
    }
    let counters_before = |end: usize| [end - 3 * WORD, end - 2 * WORD, end - WORD];
    let values =
        |offs: &[usize]| -> Vec<usize> { offs.iter().map(|&off| at(loaded, off)).collect() };
    let expected = [served, consumed, served];
    let (counters, frame) = if values(&counters_before(read)) == expected {
        (counters_before(read), None)
    } else if read >= 5 * WORD
        && values(&counters_before(read - 2 * WORD)) == expected
        && values(&[read - 2 * WORD, read - WORD]) == FRAME_AT_REST
    {
        (
            counters_before(read - 2 * WORD),
            Some([read - 2 * WORD, read - WORD]),
        )
    } else {
        let seen = values(&counters_before(read));
        return Err(format!(
            "input counters read {seen:?}, expected [{served}, {consumed}, {served}]"
        ));
    };
    let absent = [offsets[1], offsets[3]]
        .iter()
        .all(|&off| at(loaded, off) == 0);
    if !absent || at(loaded, read) == 0 {
        return Err("the probe's file methods are not where they were found".into());
    }
    Ok(Layout {
        methods: offsets,
        counters,
        frame,
    })
}

/// True once the layout is known: loads of live unpicklers can then be served the judged bytes.
pub fn layout_known() -> bool {
    LAYOUT.get().is_some()
}

/// Fails, saying why, unless the layout is known: `_pickle.Unpickler.load` is redirected only then.
pub fn require_layout() -> PyResult<()> {
    if layout_known() {
        return Ok(());
    }
    let why = UNKNOWN
        .lock()
        .clone()
        .unwrap_or_else(|| "the input fields of _pickle.Unpickler were not probed".into());
    Err(pyo3::exceptions::PyTypeError::new_err(why))
}

/// The unpickler's own `read` and `readline`, or `None` when `__init__` was never called.
pub fn reader<'py>(
    unpickler: &Bound<'py, PyAny>,
) -> Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let layout = LAYOUT.get()?;
    let method = |off: usize| {
        // SAFETY: `off` is a `PyObject *` field of the unpickler (the layout says so), read with
        // the GIL held; a non-null one is a reference the unpickler owns while it lives.
        unsafe {
            let ptr = *field(unpickler, off) as *mut ffi::PyObject;
            Bound::from_borrowed_ptr_or_opt(unpickler.py(), ptr)
        }
    };
    Some((method(layout.methods[0])?, method(layout.methods[2])?))
}

/// The unpickler reading `stream` instead of its file, until dropped. The input buffer is emptied
/// on both sides, so no byte read before (or after) the swap is served inside it.
pub struct Swapped<'py> {
    unpickler: Bound<'py, PyAny>,
    layout: &'static Layout,
    saved: [*mut ffi::PyObject; 4],
    /// Held for the swap's duration, so a field that still points at one is known to be ours.
    placed: [Option<Bound<'py, PyAny>>; 4],
}

/// Empties the unpickler's input buffer: its counters (and frame fields) as between two loads.
fn clear_counters(unpickler: &Bound<'_, PyAny>, layout: &Layout) {
    let rest = layout.counters.into_iter().map(|off| (off, 0)).chain(
        layout
            .frame
            .into_iter()
            .flat_map(|f| f.into_iter().zip(FRAME_AT_REST)),
    );
    for (off, value) in rest {
        // SAFETY: `off` is one of the unpickler's `Py_ssize_t` counters found by the probe; the
        // GIL is held (`Bound`), and the values written are what `_pickle.c` leaves between loads.
        unsafe { *field(unpickler, off) = value };
    }
}

pub fn swap<'py>(
    unpickler: &Bound<'py, PyAny>,
    stream: &Bound<'py, PyAny>,
) -> PyResult<Swapped<'py>> {
    let layout = LAYOUT
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("the unpickler layout is not known"))?;
    let optional = |name: &str| stream.getattr(name).ok();
    let placed = [
        Some(stream.getattr("read")?),
        optional("readinto"),
        Some(stream.getattr("readline")?),
        None,
    ];
    let mut saved = [std::ptr::null_mut(); 4];
    clear_counters(unpickler, layout);
    for ((slot, off), new) in saved.iter_mut().zip(layout.methods).zip(&placed) {
        let method = field(unpickler, off).cast::<*mut ffi::PyObject>();
        // SAFETY: `off` is one of the unpickler's four `PyObject *` file-method fields, owned
        // references (or null); the GIL is held. Its reference moves to `saved` (given back by
        // `Drop`) and the field takes a new reference of its own to the stream's method.
        unsafe {
            *slot = *method;
            *method = new
                .as_ref()
                .map_or(std::ptr::null_mut(), |b| b.clone().into_ptr());
        }
    }
    Ok(Swapped {
        unpickler: unpickler.clone(),
        layout,
        saved,
        placed,
    })
}

impl Drop for Swapped<'_> {
    fn drop(&mut self) {
        clear_counters(&self.unpickler, self.layout);
        for ((saved, off), placed) in self.saved.iter().zip(self.layout.methods).zip(&self.placed) {
            let method = field(&self.unpickler, off).cast::<*mut ffi::PyObject>();
            let ours = placed.as_ref().map_or(std::ptr::null_mut(), |b| b.as_ptr());
            // SAFETY: the same `PyObject *` fields `swap` filled, with the GIL held (a `Bound`
            // lives in `self`). While the field still holds the reference `swap` gave it, that
            // reference is dropped and the saved one moves back; otherwise `__init__` ran again
            // during the load and owns the field, so only the saved reference is dropped.
            unsafe {
                if *method == ours {
                    let current = std::mem::replace(&mut *method, *saved);
                    if !current.is_null() {
                        ffi::Py_DecRef(current);
                    }
                } else if !saved.is_null() {
                    // __init__ ran again during the load: its new file stays.
                    ffi::Py_DecRef(*saved);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: [usize; 4] = [0xa1, 0xa2, 0xa3, 0xa4];

    /// Two probes as `learn_unpickler_layout` sees them: fields before `read` at word 8, the
    /// counters (`input_len`, `next_read_idx`, `prefetched_idx`) just before it, or before the
    /// two FRAME words where `frame` is set.
    fn probes(frame: bool, served: usize, consumed: usize) -> (Vec<usize>, Vec<usize>) {
        let mut fresh = vec![0x11; 16];
        let mut loaded = vec![0x22; 16];
        for (i, method) in METHODS.iter().enumerate() {
            fresh[8 + i] = *method;
        }
        let counters = if frame { 3 } else { 5 };
        loaded[counters..counters + 3].copy_from_slice(&[served, consumed, served]);
        if frame {
            loaded[6..8].copy_from_slice(&FRAME_AT_REST);
        }
        // The loaded probe's file has `read` and `readline` only.
        loaded[8..12].copy_from_slice(&[0xb1, 0, 0xb3, 0]);
        (fresh, loaded)
    }

    #[test]
    fn finds_the_fields_before_the_frame_fix() {
        let (fresh, loaded) = probes(false, 100, 40);
        let layout = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap();
        assert_eq!(layout.methods, [8, 9, 10, 11].map(|i| i * WORD));
        assert_eq!(layout.counters, [5, 6, 7].map(|i| i * WORD));
        assert_eq!(layout.frame, None);
    }

    #[test]
    fn finds_the_frame_fields_of_3_13_15_and_3_14_7() {
        let (fresh, loaded) = probes(true, 100, 40);
        let layout = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap();
        assert_eq!(layout.counters, [3, 4, 5].map(|i| i * WORD));
        assert_eq!(layout.frame, Some([6 * WORD, 7 * WORD]));
    }

    #[test]
    fn refuses_a_method_found_twice_or_not_at_all() {
        let (mut fresh, loaded) = probes(false, 100, 40);
        fresh[2] = METHODS[1];
        let why = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap_err();
        assert_eq!(why, "a file method was found in 2 places");
        fresh[2] = 0;
        fresh[9] = 0;
        let why = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap_err();
        assert_eq!(why, "a file method was found in 0 places");
    }

    #[test]
    fn refuses_counters_that_do_not_show_the_load() {
        let (fresh, loaded) = probes(false, 100, 40);
        let why = find_layout(&fresh, METHODS, &loaded, 100, 41).unwrap_err();
        assert_eq!(
            why,
            "input counters read [100, 40, 100], expected [100, 41, 100]"
        );
    }

    #[test]
    fn refuses_file_methods_that_moved_in_the_loaded_probe() {
        let (fresh, mut loaded) = probes(false, 100, 40);
        loaded[9] = 0xb2; // a `readinto` the loaded probe's file does not have
        let why = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap_err();
        assert_eq!(
            why,
            "the probe's file methods are not where they were found"
        );
    }

    #[test]
    fn refuses_read_without_room_for_the_counters() {
        let (mut fresh, loaded) = probes(false, 100, 40);
        fresh.rotate_left(7); // `read` now at word 1
        let why = find_layout(&fresh, METHODS, &loaded, 100, 40).unwrap_err();
        assert_eq!(why, "no room for the input counters before read");
    }
}
