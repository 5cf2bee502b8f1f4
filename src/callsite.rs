//! Names the callsite from the interpreter's frames, in Rust: the nearest frame whose module
//! is not a loader, as `module:qualname`, cached per (code, globals) pair.

use crate::ffi::PyFrame_GetCode;
use crate::state;
use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a frame of a given code object in given globals means for the callsite.
enum Seen {
    Loader,
    Site(Arc<str>),
}

struct Cached {
    seen: Seen,
    // Held so that the pointers in the key cannot be reused by other objects.
    _code: Py<PyAny>,
    _globals: Py<PyAny>,
}

const CACHE_LIMIT: usize = 16_384;

/// The answers for one gate (`state::generation`): a new install may change the `loaders` list.
struct Cache {
    generation: u64,
    seen: HashMap<(usize, usize), Cached>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
/// Counts the times `CACHE` dropped entries. An entry's key is the address of objects the entry
/// holds, so a key remembered outside the cache means the same code only while the epoch stays.
static CACHE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// A site one thread named from its innermost frame, and when (gate and cache epoch).
struct LastSite {
    key: (usize, usize),
    generation: u64,
    epoch: u64,
    site: Arc<str>,
}

thread_local! {
    /// The last site named from the innermost frame: a loop of loads asks the same again.
    static LAST_SITE: RefCell<Option<LastSite>> = const { RefCell::new(None) };
}

/// The cache for the gate in force, emptied if the gate changed since it was filled.
fn cache_for(slot: &mut Option<Cache>) -> &mut HashMap<(usize, usize), Cached> {
    let generation = state::generation();
    let cache = slot.get_or_insert_with(|| Cache {
        generation,
        seen: HashMap::new(),
    });
    if cache.generation != generation {
        CACHE_EPOCH.fetch_add(1, Ordering::AcqRel);
        *cache = Cache {
            generation,
            seen: HashMap::new(),
        };
    }
    &mut cache.seen
}

/// True when frames of `module` are skipped when naming the callsite.
fn is_loader_module(module: &str) -> bool {
    let extra = state::current()
        .and_then(|g| g.manifest().map(|m| m.loaders.clone()))
        .unwrap_or_default();
    picklegate_core::callsite::is_loader_module(module, &extra)
}

fn classify(py: Python<'_>, code: &Bound<'_, PyAny>, globals: &Bound<'_, PyAny>) -> PyResult<Seen> {
    let module: String = match globals.get_item(intern!(py, "__name__")) {
        Ok(name) => name.extract().unwrap_or_else(|_| "?".into()),
        Err(_) => "?".into(),
    };
    if is_loader_module(&module) {
        return Ok(Seen::Loader);
    }
    let qualname = match code.getattr(intern!(py, "co_qualname")) {
        Ok(qualname) => qualname,
        // CPython 3.9 and 3.10: found where the compiler left it (picklegate/_qualname.py).
        Err(_) => py
            .import(intern!(py, "picklegate._qualname"))?
            .call_method1(intern!(py, "of"), (code,))?,
    };
    Ok(Seen::Site(
        format!("{module}:{}", qualname.extract::<String>()?).into(),
    ))
}

/// The site last named from the innermost frame, if that frame's code and globals are `key` and
/// nothing changed since (the gate, the cache).
fn last_site(key: (usize, usize)) -> Option<Arc<str>> {
    LAST_SITE.with(|last| {
        last.borrow()
            .as_ref()
            .filter(|last| {
                last.key == key
                    && last.generation == state::generation()
                    && last.epoch == CACHE_EPOCH.load(Ordering::Acquire)
            })
            .map(|last| last.site.clone())
    })
}

/// Remembers a site named from the innermost frame, with the gate generation and the cache epoch
/// read before it was looked up.
fn remember_last_site(key: (usize, usize), (generation, epoch): (u64, u64), site: &Arc<str>) {
    LAST_SITE.with(|last| {
        *last.borrow_mut() = Some(LastSite {
            key,
            generation,
            epoch,
            site: site.clone(),
        })
    });
}

/// The callsite of the code running now.
pub fn current(py: Python<'_>) -> PyResult<Arc<str>> {
    // SAFETY: the GIL is held (`py`); the result is a borrowed frame, or null outside any frame.
    let raw = unsafe { ffi::PyEval_GetFrame() };
    if raw.is_null() {
        return Ok("?:?".into());
    }
    // SAFETY: non-null (checked): the running frame, alive while the code that called us runs.
    let mut frame = unsafe { Bound::from_borrowed_ptr(py, raw as *mut ffi::PyObject) };
    let mut innermost = true;
    loop {
        // SAFETY: `frame` is a live frame object (PyEval_GetFrame or f_back, held by `frame`), and
        // PyFrame_GetCode returns a new, never null, reference to its code.
        let code = unsafe { Bound::from_owned_ptr(py, PyFrame_GetCode(frame.as_ptr())) };
        // SAFETY: the thread holds the GIL; PyEval_GetGlobals returns the running (innermost)
        // frame's globals as a borrowed reference, or null, and `from_borrowed_ptr_or_opt` takes a
        // new reference before anything else runs.
        let running = innermost
            .then(|| unsafe { Bound::from_borrowed_ptr_or_opt(py, ffi::PyEval_GetGlobals()) })
            .flatten();
        let globals = match running {
            Some(globals) => globals, // the same as `f_globals`, without an attribute lookup
            None => frame.getattr(intern!(py, "f_globals"))?,
        };
        let key = (code.as_ptr() as usize, globals.as_ptr() as usize);
        if innermost {
            if let Some(site) = last_site(key) {
                return Ok(site);
            }
        }
        let when = (state::generation(), CACHE_EPOCH.load(Ordering::Acquire));
        let known: Option<Option<Arc<str>>> =
            cache_for(&mut CACHE.lock())
                .get(&key)
                .map(|entry| match &entry.seen {
                    Seen::Loader => None,
                    Seen::Site(site) => Some(site.clone()),
                });
        let site = match known {
            Some(site) => site,
            None => {
                let seen = classify(py, &code, &globals)?;
                let site = match &seen {
                    Seen::Loader => None,
                    Seen::Site(site) => Some(site.clone()),
                };
                let mut slot = CACHE.lock();
                let cache = cache_for(&mut slot);
                if cache.len() >= CACHE_LIMIT {
                    CACHE_EPOCH.fetch_add(1, Ordering::AcqRel);
                    cache.clear();
                }
                cache.insert(
                    key,
                    Cached {
                        seen,
                        _code: code.unbind(),
                        _globals: globals.unbind(),
                    },
                );
                site
            }
        };
        if let Some(site) = site {
            if innermost {
                remember_last_site(key, when, &site);
            }
            return Ok(site);
        }
        innermost = false;
        let back = frame.getattr(intern!(py, "f_back"))?;
        if back.is_none() {
            return Ok("?:?".into());
        }
        frame = back;
    }
}

/// `module:qualname` of the nearest frame outside pickle, picklegate and the loader libraries.
#[pyfunction]
pub fn current_callsite(py: Python<'_>) -> PyResult<String> {
    current(py).map(|s| s.to_string())
}
