//! Interposition below Python: `_pickle.loads` and `_pickle.load` share one `PyMethodDef` with
//! every reference to them, so pointing its `ml_meth` at picklegate reaches references captured
//! before install (`from pickle import loads`, `cloudpickle.loads`, multiprocessing's).
//!
//! The layouts are CPython's own, recognised per version (3.9 to 3.14) and checked before any
//! write; where one is not recognised, `enforce` refuses to run unless the operator opted in to
//! the audit-hook backstop alone (`PICKLEGATE_BACKSTOP_ONLY=1`, `install(backstop_only=True)`).

use crate::errors::Error;
use crate::ffi::{
    CFunctionHead, DefiningClassFastCall, FastCallKeywords, MethodDef, MethodDescrHead, NoArgs,
    METH_FASTCALL, METH_KEYWORDS, METH_METHOD, METH_NOARGS,
};
use crate::load::{guarded_c_loads, guarded_c_unpickler};
use crate::state;
use parking_lot::Mutex;
use picklegate_core::decision::{backstop_only_setting, interposition, Interposition};
use picklegate_core::policy::Mode;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};
use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// How `_pickle.Unpickler.load` is declared in `Modules/_pickle.c` of each CPython version.
#[derive(Clone, Copy, Debug, PartialEq)]
enum UnpicklerLoadLayout {
    /// 3.9 to 3.11: `_pickle_Unpickler_load(self, unused)`, METH_NOARGS.
    NoArgs,
    /// 3.12 to 3.14: `_pickle_Unpickler_load(self, cls, args, nargs, kwnames)`: the module state
    /// is found from the defining class (the types became heap types).
    DefiningClass,
}

impl UnpicklerLoadLayout {
    fn flags(self) -> c_int {
        match self {
            UnpicklerLoadLayout::NoArgs => METH_NOARGS,
            UnpicklerLoadLayout::DefiningClass => METH_METHOD | METH_FASTCALL | METH_KEYWORDS,
        }
    }
}

/// The layouts of the CPython versions picklegate knows; `None` for any other version.
/// `_pickle.loads` and `_pickle.load` are METH_FASTCALL|METH_KEYWORDS module functions in all.
fn known_layout(version: (u8, u8)) -> Option<UnpicklerLoadLayout> {
    match version {
        (3, 9..=11) => Some(UnpicklerLoadLayout::NoArgs),
        (3, 12..=14) => Some(UnpicklerLoadLayout::DefiningClass),
        _ => None,
    }
}

fn running_version(py: Python<'_>) -> String {
    let version = py.version_info();
    format!("{}.{}.{}", version.major, version.minor, version.patch)
}

fn running_layout(py: Python<'_>) -> PyResult<UnpicklerLoadLayout> {
    let version = py.version_info();
    known_layout((version.major, version.minor)).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "CPython {}.{} is not a version whose _pickle layouts picklegate knows (3.9 to 3.14)",
            version.major, version.minor
        ))
    })
}

/// The original `_pickle.loads` implementation, once redirected.
static ORIGINAL_LOADS: OnceLock<FastCallKeywords> = OnceLock::new();

/// The original `_pickle.Unpickler.load`, in the layout of the running CPython.
#[derive(Clone, Copy)]
enum OriginalUnpicklerLoad {
    NoArgs(NoArgs),
    DefiningClass(DefiningClassFastCall),
}

static ORIGINAL_UNPICKLER_LOAD: OnceLock<OriginalUnpicklerLoad> = OnceLock::new();
/// The Python wrapper that `_pickle.load` calls are sent to (it reads the file first).
static LOAD_WRAPPER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Why each redirect that failed could not be set up: `(what, why)`.
static FAILURES: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());
/// The operator accepted `enforce` with the audit-hook backstop alone where a redirect is missing.
static BACKSTOP_ONLY: AtomicBool = AtomicBool::new(false);
static BACKSTOP_ONLY_SAID: AtomicBool = AtomicBool::new(false);

/// Runs a redirect; a failure is remembered, to name it when `enforce` refuses to start.
fn recorded<T>(py: Python<'_>, what: &'static str, result: PyResult<T>) -> PyResult<T> {
    if let Err(err) = &result {
        FAILURES.lock().push((what, err.value(py).to_string()));
    }
    result
}

fn into_raw(py: Python<'_>, result: PyResult<Py<PyAny>>) -> *mut ffi::PyObject {
    match result {
        Ok(obj) => obj.into_ptr(),
        Err(err) => {
            err.restore(py);
            std::ptr::null_mut()
        }
    }
}

fn internal_error() -> PyErr {
    PyRuntimeError::new_err(picklegate_core::decision::INTERNAL_ERROR)
}

/// The arguments of a METH_FASTCALL|METH_KEYWORDS call, positional then keyword values.
///
/// # Safety
/// As CPython passes them: `args` holds `nargs` values, then one per name of `kwnames` (a tuple,
/// or null), all alive for the call; the GIL is held.
unsafe fn fastcall_args(
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> Vec<*mut ffi::PyObject> {
    let keywords = if kwnames.is_null() {
        0
    } else {
        // SAFETY: a non-null `kwnames` is the call's tuple of keyword names; the GIL is held.
        unsafe { ffi::PyTuple_Size(kwnames) }
    };
    let total = (nargs + keywords) as usize;
    // SAFETY: the caller's `args` holds exactly `nargs + len(kwnames)` pointers.
    unsafe { std::slice::from_raw_parts(args, total) }.to_vec()
}

/// `_pickle.loads(data, ...)`: judged in Rust, then the original C function on the same args.
///
/// # Safety
/// Called by CPython only, as the `ml_meth` of `_pickle.loads` (METH_FASTCALL|METH_KEYWORDS):
/// GIL held, `args`/`nargs`/`kwnames` in the vectorcall convention.
unsafe extern "C" fn loads_trampoline(
    module: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a C function with the GIL held (default builds, 3.9 to 3.14).
    let py = unsafe { Python::assume_attached() };
    let original = *ORIGINAL_LOADS
        .get()
        .expect("redirected before the trampoline is installed");
    // `data`, when given, replaces the first argument (a private copy of a mutable buffer).
    let call_original = |data: Option<&Bound<'_, PyAny>>| {
        let result = match data {
            // SAFETY: the original `_pickle.loads` on the very arguments CPython gave us.
            None => unsafe { original(module, args, nargs, kwnames) },
            Some(data) => {
                // SAFETY: `args`, `nargs` and `kwnames` are CPython's, unchanged (see above).
                let mut replaced = unsafe { fastcall_args(args, nargs, kwnames) };
                replaced[0] = data.as_ptr(); // `data` is only passed when nargs >= 1
                                             // SAFETY: the same arguments with the first replaced by `data`, which the
                                             // closure's caller keeps alive (borrowed) for the call.
                unsafe { original(module, replaced.as_ptr(), nargs, kwnames) }
            }
        };
        // SAFETY: a C function returns a new reference, or null with an exception set.
        unsafe { Bound::from_owned_ptr_or_err(py, result) }.map(Bound::unbind)
    };
    if nargs < 1 {
        return into_raw(py, call_original(None)); // the original raises its own TypeError
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: nargs >= 1, so `args[0]` is the call's first argument, alive for the call.
        let data = unsafe { Bound::from_borrowed_ptr(py, *args) };
        guarded_c_loads(py, &data, call_original)
    }));
    into_raw(py, outcome.unwrap_or_else(|_| Err(internal_error())))
}

/// Calls `callable` with vectorcall-style arguments through the 3.9 stable ABI
/// (`PyObject_Vectorcall` is in it only from 3.12).
///
/// # Safety
/// `args`, `nargs` and `kwnames` are a METH_FASTCALL|METH_KEYWORDS call's, as CPython passed them.
unsafe fn call_fastcall(
    py: Python<'_>,
    callable: &Bound<'_, PyAny>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Py<PyAny>> {
    // SAFETY: the caller passes CPython's call arguments unchanged.
    let values = unsafe { fastcall_args(args, nargs, kwnames) };
    // SAFETY: each value is a live object, borrowed from the call for its duration.
    let arg = |i: usize| unsafe { Bound::from_borrowed_ptr(py, values[i]) };
    let positional = PyTuple::new(py, (0..nargs as usize).map(arg))?;
    let keywords = if kwnames.is_null() {
        None
    } else {
        // SAFETY: a non-null `kwnames` is the call's tuple of names, alive for the call.
        let names = unsafe { Bound::from_borrowed_ptr(py, kwnames) }.cast_into::<PyTuple>()?;
        let dict = PyDict::new(py);
        for (i, name) in names.iter().enumerate() {
            dict.set_item(name, arg(nargs as usize + i))?;
        }
        Some(dict)
    };
    callable
        .call(positional, keywords.as_ref())
        .map(Bound::unbind)
}

/// `_pickle.load(file, ...)`: forwarded to the Python wrapper, which reads the file and decides.
///
/// # Safety
/// Called by CPython only, as the `ml_meth` of `_pickle.load` (METH_FASTCALL|METH_KEYWORDS).
unsafe extern "C" fn load_trampoline(
    _module: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a C function with the GIL held (default builds, 3.9 to 3.14).
    let py = unsafe { Python::assume_attached() };
    let result = match LOAD_WRAPPER.get(py) {
        // SAFETY: the arguments are CPython's for this METH_FASTCALL|METH_KEYWORDS call.
        Some(wrapper) => unsafe { call_fastcall(py, wrapper.bind(py), args, nargs, kwnames) },
        None => Err(PyRuntimeError::new_err(
            "picklegate: _pickle.load has no wrapper",
        )),
    };
    into_raw(py, result)
}

/// `_pickle.Unpickler.load` of any unpickler, whatever its class or when it was made, on 3.9 to
/// 3.11: its next pickle is judged, then the original runs on exactly those bytes.
///
/// # Safety
/// Called by CPython only, as the METH_NOARGS `ml_meth` of `_pickle.Unpickler.load`.
unsafe extern "C" fn unpickler_load_trampoline(
    slf: *mut ffi::PyObject,
    unused: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a C method with the GIL held (default builds, 3.9 to 3.14).
    let py = unsafe { Python::assume_attached() };
    let Some(OriginalUnpicklerLoad::NoArgs(original)) = ORIGINAL_UNPICKLER_LOAD.get().copied()
    else {
        return into_raw(py, Err(internal_error()));
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `slf` is the unpickler the method was called on, alive for the call.
        let unpickler = unsafe { Bound::from_borrowed_ptr(py, slf) };
        guarded_c_unpickler(py, &unpickler, || {
            // SAFETY: the original METH_NOARGS method on CPython's own `(self, NULL)`; it returns
            // a new reference or null with an exception set.
            unsafe { Bound::from_owned_ptr_or_err(py, original(slf, unused)) }.map(Bound::unbind)
        })
    }));
    into_raw(py, outcome.unwrap_or_else(|_| Err(internal_error())))
}

/// The same for 3.12 to 3.14, where the method also receives its defining class and arguments.
///
/// # Safety
/// Called by CPython only, as the METH_METHOD|METH_FASTCALL|METH_KEYWORDS `ml_meth` of
/// `_pickle.Unpickler.load`.
unsafe extern "C" fn unpickler_load_method_trampoline(
    slf: *mut ffi::PyObject,
    defining_class: *mut ffi::PyTypeObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a C method with the GIL held (default builds, 3.9 to 3.14).
    let py = unsafe { Python::assume_attached() };
    let Some(OriginalUnpicklerLoad::DefiningClass(original)) =
        ORIGINAL_UNPICKLER_LOAD.get().copied()
    else {
        return into_raw(py, Err(internal_error()));
    };
    let call_original = || {
        // SAFETY: the original `PyCMethod` on the arguments CPython gave us, unchanged; it
        // returns a new reference or null with an exception set.
        unsafe {
            Bound::from_owned_ptr_or_err(py, original(slf, defining_class, args, nargs, kwnames))
        }
        .map(Bound::unbind)
    };
    // SAFETY: a non-null `kwnames` is the call's tuple of keyword names.
    if nargs != 0 || (!kwnames.is_null() && unsafe { ffi::PyTuple_Size(kwnames) } != 0) {
        return into_raw(py, call_original()); // "load() takes no arguments", from the original
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `slf` is the unpickler the method was called on, alive for the call.
        let unpickler = unsafe { Bound::from_borrowed_ptr(py, slf) };
        guarded_c_unpickler(py, &unpickler, call_original)
    }));
    into_raw(py, outcome.unwrap_or_else(|_| Err(internal_error())))
}

/// The type of every C function object (`builtin_function_or_method`), and of every C method
/// descriptor (`method_descriptor`), taken from builtins that have them.
fn builtin_types(py: Python<'_>) -> PyResult<(Bound<'_, PyAny>, Bound<'_, PyAny>)> {
    let builtins = py.import("builtins")?;
    let function = builtins.getattr("len")?.get_type().into_any();
    let descriptor = builtins
        .getattr("str")?
        .getattr("__dict__")?
        .get_item("join")?
        .get_type()
        .into_any();
    Ok((function, descriptor))
}

/// The name of a method definition; empty when there is none.
///
/// # Safety
/// `def` is null or points to a live `PyMethodDef` whose name is null or a static C string
/// (CPython's method tables are static for the life of the module).
unsafe fn def_name(def: *const MethodDef) -> &'static str {
    // SAFETY: the caller guarantees `def` is null or a live `PyMethodDef`.
    let Some(def) = (unsafe { def.as_ref() }) else {
        return "";
    };
    if def.name.is_null() {
        return "";
    }
    // SAFETY: a non-null `ml_name` is a NUL-terminated static string (caller's guarantee).
    unsafe { CStr::from_ptr(def.name) }.to_str().unwrap_or("")
}

/// Points the method `_pickle.Unpickler.load` at the trampoline for this CPython's layout.
#[pyfunction]
pub fn redirect_unpickler_load(py: Python<'_>, cls: &Bound<'_, PyAny>) -> PyResult<()> {
    recorded(
        py,
        "_pickle.Unpickler.load",
        redirect_unpickler_load_checked(py, cls),
    )
}

fn redirect_unpickler_load_checked(py: Python<'_>, cls: &Bound<'_, PyAny>) -> PyResult<()> {
    let layout = running_layout(py)?;
    crate::unpickler::require_layout()?; // the trampoline serves each load its judged bytes through them
    let descriptor = cls.getattr("__dict__")?.get_item("load")?;
    if !descriptor.get_type().is(&builtin_types(py)?.1) {
        return Err(PyTypeError::new_err(format!(
            "_pickle.Unpickler.load is not a C method but {}",
            descriptor.get_type()
        )));
    }
    let head = descriptor.as_ptr().cast::<MethodDescrHead>();
    // SAFETY: `descriptor`'s type is exactly `method_descriptor` (checked above), whose objects
    // start with `MethodDescrHead` on every CPython `known_layout` accepts; `descriptor` is alive.
    let (def, defining_type) = unsafe { ((*head).d_method, (*head).d_type) };
    // SAFETY: a method descriptor's `d_method` points into its type's static method table.
    let (name, flags) = unsafe { (def_name(def), def.as_ref().map_or(0, |d| d.flags)) };
    if name != "load"
        || defining_type.cast::<ffi::PyObject>() != cls.as_ptr()
        || flags != layout.flags()
    {
        return Err(PyTypeError::new_err(format!(
            "_pickle.Unpickler.load does not have the layout of CPython's {layout:?} (name {name:?}, flags {flags:#x}, expected {:#x})",
            layout.flags()
        )));
    }
    let trampoline = match layout {
        UnpicklerLoadLayout::NoArgs => unpickler_load_trampoline as *mut c_void,
        UnpicklerLoadLayout::DefiningClass => unpickler_load_method_trampoline as *mut c_void,
    };
    // SAFETY: `def` is non-null (its name was read) and lives in `_pickle`'s static method table;
    // the GIL serialises every reader and writer of `ml_meth`.
    let meth = unsafe { (*def).meth };
    if meth == trampoline {
        return Ok(());
    }
    let original = match layout {
        // SAFETY: the flags say METH_NOARGS, so `ml_meth` is a `PyCFunction` of that signature.
        UnpicklerLoadLayout::NoArgs => OriginalUnpicklerLoad::NoArgs(unsafe {
            std::mem::transmute::<*mut c_void, NoArgs>(meth)
        }),
        // SAFETY: the flags say METH_METHOD|METH_FASTCALL|METH_KEYWORDS: `ml_meth` is a `PyCMethod`.
        UnpicklerLoadLayout::DefiningClass => OriginalUnpicklerLoad::DefiningClass(unsafe {
            std::mem::transmute::<*mut c_void, DefiningClassFastCall>(meth)
        }),
    };
    ORIGINAL_UNPICKLER_LOAD
        .set(original)
        .map_err(|_| PyRuntimeError::new_err("_pickle.Unpickler.load was redirected twice"))?;
    // SAFETY: as above; the trampoline has the same signature as the original, which it calls.
    unsafe { (*def).meth = trampoline };
    Ok(())
}

/// Checks that `function` is the C function `name` with the calling convention picklegate knows,
/// and returns its method definition (non-null).
fn method_def(py: Python<'_>, function: &Bound<'_, PyAny>, name: &str) -> PyResult<*mut MethodDef> {
    running_layout(py)?;
    if !function.get_type().is(&builtin_types(py)?.0) {
        return Err(PyTypeError::new_err(format!(
            "_pickle.{name} is not a C function but {}",
            function.get_type()
        )));
    }
    // SAFETY: `function`'s type is exactly `builtin_function_or_method` (checked above), whose
    // objects start with `CFunctionHead` on every CPython `known_layout` accepts.
    let def = unsafe { (*function.as_ptr().cast::<CFunctionHead>()).m_ml };
    // SAFETY: `m_ml` points into the defining module's static method table.
    let (def_name, flags) = unsafe { (def_name(def), def.as_ref().map_or(0, |d| d.flags)) };
    if def_name != name || flags != METH_FASTCALL | METH_KEYWORDS {
        return Err(PyTypeError::new_err(format!(
            "_pickle.{name} does not have the layout picklegate knows (name {def_name:?}, flags {flags:#x})"
        )));
    }
    Ok(def)
}

/// Points `_pickle.loads` (the function object `original`) at the Rust decision point. Every
/// reference to it, including ones captured before, now decides before it unpickles.
#[pyfunction]
pub fn redirect_loads(py: Python<'_>, original: &Bound<'_, PyAny>) -> PyResult<()> {
    recorded(
        py,
        "_pickle.loads",
        method_def(py, original, "loads").and_then(|def| {
            // SAFETY: `def` is the non-null, static `PyMethodDef` of `_pickle.loads`; the GIL
            // serialises every reader and writer of `ml_meth`.
            let meth = unsafe { (*def).meth };
            if meth == loads_trampoline as *mut c_void {
                return Ok(());
            }
            // SAFETY: its flags are METH_FASTCALL|METH_KEYWORDS (checked by `method_def`), so
            // `ml_meth` has exactly that signature.
            let current = unsafe { std::mem::transmute::<*mut c_void, FastCallKeywords>(meth) };
            ORIGINAL_LOADS
                .set(current)
                .map_err(|_| PyRuntimeError::new_err("_pickle.loads was redirected twice"))?;
            // SAFETY: as above; the trampoline has the same signature and calls `current`.
            unsafe { (*def).meth = loads_trampoline as *mut c_void };
            Ok(())
        }),
    )
}

/// Points `_pickle.load` at `wrapper`, and returns a fresh function object that still runs the
/// original code, for the wrapper to call after its decision.
#[pyfunction]
pub fn redirect_load(
    py: Python<'_>,
    original: &Bound<'_, PyAny>,
    wrapper: Py<PyAny>,
) -> PyResult<Py<PyAny>> {
    recorded(
        py,
        "_pickle.load",
        method_def(py, original, "load").and_then(|def| {
            // SAFETY: `def` is the non-null, static `PyMethodDef` of `_pickle.load`; the GIL
            // serialises every reader and writer of it.
            let copy = unsafe {
                if (*def).meth == load_trampoline as *mut c_void {
                    return Err(PyRuntimeError::new_err(
                        "_pickle.load is already redirected",
                    ));
                }
                MethodDef {
                    name: (*def).name,
                    meth: (*def).meth,
                    flags: (*def).flags,
                    doc: (*def).doc,
                }
            };
            // Leaked on purpose: a function object keeps a borrowed pointer to its definition.
            let copy = Box::into_raw(Box::new(copy));
            // SAFETY: `copy` has `PyMethodDef`'s layout and lives forever; the self object is
            // `_pickle.load`'s own module (a borrowed reference, which NewEx increfs).
            let fresh = unsafe {
                ffi::PyCFunction_NewEx(
                    copy.cast::<ffi::PyMethodDef>(),
                    ffi::PyCFunction_GetSelf(original.as_ptr()),
                    std::ptr::null_mut(),
                )
            };
            // SAFETY: `PyCFunction_NewEx` returns a new reference or null with an exception set.
            let fresh = unsafe { Bound::from_owned_ptr_or_err(py, fresh) }?;
            LOAD_WRAPPER
                .set(py, wrapper)
                .map_err(|_| PyValueError::new_err("_pickle.load was redirected twice"))?;
            // SAFETY: as above; `load_trampoline` has the METH_FASTCALL|METH_KEYWORDS signature.
            unsafe { (*def).meth = load_trampoline as *mut c_void };
            Ok(fresh.unbind())
        }),
    )
}

/// What is not redirected: one line per entry point, with the reason its redirect failed.
fn missing_redirects(py: Python<'_>) -> Vec<String> {
    let failures = FAILURES.lock();
    let reason = |what: &str| {
        failures.iter().rev().find(|(w, _)| *w == what).map_or_else(
            || "not attempted after the failure above".to_string(),
            |(_, why)| why.clone(),
        )
    };
    let mut missing = Vec::new();
    if ORIGINAL_LOADS.get().is_none() {
        missing.push(format!("_pickle.loads ({})", reason("_pickle.loads")));
    }
    if LOAD_WRAPPER.get(py).is_none() {
        missing.push(format!("_pickle.load ({})", reason("_pickle.load")));
    }
    if ORIGINAL_UNPICKLER_LOAD.get().is_none() {
        missing.push(format!(
            "_pickle.Unpickler.load ({})",
            reason("_pickle.Unpickler.load")
        ));
    }
    missing
}

/// The operator accepts `enforce` guarded by the audit-hook backstop alone where a redirect cannot
/// be set up (`install(backstop_only=True)`). It cannot be taken back.
#[pyfunction]
pub fn accept_backstop_only() {
    BACKSTOP_ONLY.store(true, Ordering::SeqCst);
}

/// Under `enforce`, fails with a `PolicyError` naming each entry point that is not redirected,
/// unless the operator accepted backstop-only enforcement, which is then said on stderr once.
/// Called after every activation; other modes run with what is redirected.
#[pyfunction]
pub fn require_full_interposition(py: Python<'_>) -> Result<(), Error> {
    let mode = state::current().map_or(Mode::Off, |gate| gate.policy.mode);
    let accepted = || {
        Ok(BACKSTOP_ONLY.load(Ordering::SeqCst)
            || backstop_only_setting(std::env::var("PICKLEGATE_BACKSTOP_ONLY").ok().as_deref())?)
    };
    let missing = if mode == Mode::Enforce {
        missing_redirects(py)
    } else {
        Vec::new()
    };
    match interposition(mode, &missing, &running_version(py), accepted).map_err(Error::Policy)? {
        Interposition::Full => Ok(()),
        Interposition::BackstopOnly { warning } => {
            if !BACKSTOP_ONLY_SAID.swap(true, Ordering::SeqCst) {
                py.import("sys")?
                    .getattr("stderr")?
                    .call_method1("write", (warning,))?;
            }
            Ok(())
        }
        Interposition::Refused { message } => Err(Error::Policy(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_known_cpython_has_the_unpickler_load_of_its_source() {
        for minor in 9..=11 {
            assert_eq!(known_layout((3, minor)), Some(UnpicklerLoadLayout::NoArgs));
        }
        for minor in 12..=14 {
            assert_eq!(
                known_layout((3, minor)),
                Some(UnpicklerLoadLayout::DefiningClass)
            );
        }
        for unknown in [(3, 8), (3, 15), (4, 0), (2, 7)] {
            assert_eq!(known_layout(unknown), None, "{unknown:?}");
        }
        assert_eq!(UnpicklerLoadLayout::NoArgs.flags(), 0x0004);
        assert_eq!(UnpicklerLoadLayout::DefiningClass.flags(), 0x0282);
    }
}
