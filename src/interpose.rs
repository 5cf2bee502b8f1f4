//! Interposition below Python: `_pickle.loads` and `_pickle.load` share one `PyMethodDef` with
//! every reference to them, so pointing its `ml_meth` at picklegate reaches references captured
//! before install (`from pickle import loads`, `cloudpickle.loads`, multiprocessing's).

use crate::load::{guarded_c_loads, guarded_foreign_unpickler};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

#[repr(C)]
struct MethodDef {
    name: *const c_char,
    meth: *mut c_void,
    flags: c_int,
    doc: *const c_char,
}

/// The head of CPython's `PyCFunctionObject`, unchanged from 3.9 to 3.13.
#[repr(C)]
struct CFunctionHead {
    ob_refcnt: ffi::Py_ssize_t,
    ob_type: *mut ffi::PyTypeObject,
    m_ml: *mut MethodDef,
}

/// The head of CPython's `PyMethodDescrObject` (`PyDescr_COMMON`, then the method), 3.9 to 3.13.
#[repr(C)]
struct MethodDescrHead {
    ob_refcnt: ffi::Py_ssize_t,
    ob_type: *mut ffi::PyTypeObject,
    d_type: *mut ffi::PyTypeObject,
    d_name: *mut ffi::PyObject,
    d_qualname: *mut ffi::PyObject,
    d_method: *mut MethodDef,
}

const METH_FASTCALL_KEYWORDS: c_int = 0x0080 | 0x0002;
const METH_NOARGS: c_int = 0x0004;

type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

type FastCallKeywords =
    unsafe extern "C" fn(*mut ffi::PyObject, *const *mut ffi::PyObject, ffi::Py_ssize_t, *mut ffi::PyObject) -> *mut ffi::PyObject;

extern "C" {
    fn PyCFunction_NewEx(def: *mut MethodDef, slf: *mut ffi::PyObject, module: *mut ffi::PyObject) -> *mut ffi::PyObject;
    fn PyObject_Vectorcall(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// The original `_pickle.loads` implementation, once redirected.
static ORIGINAL_LOADS: OnceLock<FastCallKeywords> = OnceLock::new();
/// The original `_pickle.Unpickler.load`, and the class it belongs to.
static ORIGINAL_UNPICKLER_LOAD: OnceLock<NoArgs> = OnceLock::new();
static UNPICKLER_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// The Python wrapper that `_pickle.load` calls are sent to (it reads the file first).
static LOAD_WRAPPER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn into_raw(py: Python<'_>, result: PyResult<Py<PyAny>>) -> *mut ffi::PyObject {
    match result {
        Ok(obj) => obj.into_ptr(),
        Err(err) => {
            err.restore(py);
            std::ptr::null_mut()
        }
    }
}

/// `_pickle.loads(data, ...)`: judged in Rust, then the original C function on the same args.
unsafe extern "C" fn loads_trampoline(
    module: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let original = *ORIGINAL_LOADS.get().expect("redirected before the trampoline is installed");
    // `data`, when given, replaces the first argument (a private copy of a mutable buffer).
    let call_original = |data: Option<&Bound<'_, PyAny>>| {
        let result = match data {
            None => original(module, args, nargs, kwnames),
            Some(data) => {
                let total = nargs as usize + if kwnames.is_null() { 0 } else { ffi::PyTuple_Size(kwnames) as usize };
                let mut replaced: Vec<*mut ffi::PyObject> = (0..total).map(|i| *args.add(i)).collect();
                replaced[0] = data.as_ptr();
                original(module, replaced.as_ptr(), nargs, kwnames)
            }
        };
        Bound::from_owned_ptr_or_err(py, result).map(Bound::unbind)
    };
    if nargs < 1 {
        return into_raw(py, call_original(None)); // the original raises its own TypeError
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let data = Bound::from_borrowed_ptr(py, *args);
        guarded_c_loads(py, &data, call_original)
    }));
    match outcome {
        Ok(result) => into_raw(py, result),
        Err(_) => into_raw(py, Err(PyRuntimeError::new_err("picklegate: internal error; the load was refused"))),
    }
}

/// `_pickle.load(file, ...)`: forwarded to the Python wrapper, which reads the file and decides.
unsafe extern "C" fn load_trampoline(
    _module: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    match LOAD_WRAPPER.get(py) {
        Some(wrapper) => PyObject_Vectorcall(wrapper.as_ptr(), args, nargs as usize, kwnames),
        None => into_raw(py, Err(PyRuntimeError::new_err("picklegate: _pickle.load has no wrapper"))),
    }
}

/// `_pickle.Unpickler.load` reached without picklegate's `Unpickler`: an instance of a class made
/// before install. Its file cannot be seen, so it is judged as a load that cannot be verified.
unsafe extern "C" fn unpickler_load_trampoline(slf: *mut ffi::PyObject, unused: *mut ffi::PyObject) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let original = *ORIGINAL_UNPICKLER_LOAD.get().expect("redirected before the trampoline is installed");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let unpickler = Bound::from_borrowed_ptr(py, slf);
        guarded_foreign_unpickler(py, &unpickler, || Bound::from_owned_ptr_or_err(py, original(slf, unused)).map(Bound::unbind))
    }));
    match outcome {
        Ok(result) => into_raw(py, result),
        Err(_) => into_raw(py, Err(PyRuntimeError::new_err("picklegate: internal error; the load was refused"))),
    }
}

/// Points the method `_pickle.Unpickler.load` at the trampoline above. picklegate's own
/// `Unpickler` decides first and then runs the original through `c_unpickler_load`.
#[pyfunction]
pub fn redirect_unpickler_load(py: Python<'_>, cls: &Bound<'_, PyAny>) -> PyResult<()> {
    let descriptor = cls.getattr("__dict__")?.get_item("load")?;
    if descriptor.get_type().name()? != "method_descriptor" {
        return Err(PyTypeError::new_err("_pickle.Unpickler.load is not a C method"));
    }
    unsafe {
        let def = (*(descriptor.as_ptr() as *mut MethodDescrHead)).d_method;
        let name = if def.is_null() || (*def).name.is_null() { "" } else { CStr::from_ptr((*def).name).to_str().unwrap_or("") };
        if name != "load" || (*def).flags != METH_NOARGS {
            return Err(PyTypeError::new_err(format!("_pickle.Unpickler.load does not have the layout picklegate knows (name {name:?})")));
        }
        if (*def).meth == unpickler_load_trampoline as *mut c_void {
            return Ok(());
        }
        let current: NoArgs = std::mem::transmute((*def).meth);
        ORIGINAL_UNPICKLER_LOAD.set(current).map_err(|_| PyRuntimeError::new_err("_pickle.Unpickler.load was redirected twice"))?;
        UNPICKLER_CLASS.get_or_init(py, || cls.clone().unbind());
        (*def).meth = unpickler_load_trampoline as *mut c_void;
    }
    Ok(())
}

/// Runs the original `_pickle.Unpickler.load` on `unpickler`, after picklegate decided.
#[pyfunction]
pub fn c_unpickler_load(py: Python<'_>, unpickler: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let (Some(original), Some(cls)) = (ORIGINAL_UNPICKLER_LOAD.get(), UNPICKLER_CLASS.get(py)) else {
        return Err(PyRuntimeError::new_err("_pickle.Unpickler.load is not redirected"));
    };
    if !unpickler.is_instance(cls.bind(py))? {
        return Err(PyTypeError::new_err("c_unpickler_load needs a _pickle.Unpickler"));
    }
    unsafe { Bound::from_owned_ptr_or_err(py, original(unpickler.as_ptr(), std::ptr::null_mut())).map(Bound::unbind) }
}

/// Checks that `function` is the C function `name` with the calling convention picklegate knows.
unsafe fn method_def(function: &Bound<'_, PyAny>, name: &str) -> PyResult<*mut MethodDef> {
    if function.get_type().name()? != "builtin_function_or_method" {
        return Err(PyTypeError::new_err(format!("_pickle.{name} is not a C function")));
    }
    let def = (*(function.as_ptr() as *mut CFunctionHead)).m_ml;
    let def_name = if def.is_null() || (*def).name.is_null() { "" } else { CStr::from_ptr((*def).name).to_str().unwrap_or("") };
    if def_name != name || (*def).flags != METH_FASTCALL_KEYWORDS {
        return Err(PyTypeError::new_err(format!(
            "_pickle.{name} does not have the layout picklegate knows (name {def_name:?})"
        )));
    }
    Ok(def)
}

/// Points `_pickle.loads` (the function object `original`) at the Rust decision point. Every
/// reference to it, including ones captured before, now decides before it unpickles.
#[pyfunction]
pub fn redirect_loads(original: &Bound<'_, PyAny>) -> PyResult<()> {
    unsafe {
        let def = method_def(original, "loads")?;
        if (*def).meth == loads_trampoline as *mut c_void {
            return Ok(());
        }
        let current: FastCallKeywords = std::mem::transmute((*def).meth);
        ORIGINAL_LOADS.set(current).map_err(|_| PyRuntimeError::new_err("_pickle.loads was redirected twice"))?;
        (*def).meth = loads_trampoline as *mut c_void;
    }
    Ok(())
}

/// Points `_pickle.load` at `wrapper`, and returns a fresh function object that still runs the
/// original code, for the wrapper to call after its decision.
#[pyfunction]
pub fn redirect_load(py: Python<'_>, original: &Bound<'_, PyAny>, wrapper: Py<PyAny>) -> PyResult<Py<PyAny>> {
    unsafe {
        let def = method_def(original, "load")?;
        if (*def).meth == load_trampoline as *mut c_void {
            return Err(PyRuntimeError::new_err("_pickle.load is already redirected"));
        }
        let copy = Box::into_raw(Box::new(MethodDef { name: (*def).name, meth: (*def).meth, flags: (*def).flags, doc: (*def).doc }));
        let fresh = PyCFunction_NewEx(copy, ffi::PyCFunction_GetSelf(original.as_ptr()), std::ptr::null_mut());
        let fresh = Bound::from_owned_ptr_or_err(py, fresh)?;
        LOAD_WRAPPER.set(py, wrapper).map_err(|_| PyValueError::new_err("_pickle.load was redirected twice"))?;
        (*def).meth = load_trampoline as *mut c_void;
        Ok(fresh.unbind())
    }
}
