//! Interposition below Python: `_pickle.loads` and `_pickle.load` share one `PyMethodDef` with
//! every reference to them, so pointing its `ml_meth` at picklegate reaches references captured
//! before install (`from pickle import loads`, `cloudpickle.loads`, multiprocessing's).

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

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

const METH_FASTCALL_KEYWORDS: c_int = 0x0080 | 0x0002;

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

static LOADS_WRAPPER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static LOAD_WRAPPER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

unsafe fn forward(wrapper: &PyOnceLock<Py<PyAny>>, args: *const *mut ffi::PyObject, nargs: ffi::Py_ssize_t, kwnames: *mut ffi::PyObject) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    match wrapper.get(py) {
        Some(w) => PyObject_Vectorcall(w.as_ptr(), args, nargs as usize, kwnames),
        None => {
            pyo3::exceptions::PyRuntimeError::new_err("picklegate: interposed pickle function has no wrapper").restore(py);
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn loads_trampoline(_m: *mut ffi::PyObject, args: *const *mut ffi::PyObject, nargs: ffi::Py_ssize_t, kw: *mut ffi::PyObject) -> *mut ffi::PyObject {
    forward(&LOADS_WRAPPER, args, nargs, kw)
}

unsafe extern "C" fn load_trampoline(_m: *mut ffi::PyObject, args: *const *mut ffi::PyObject, nargs: ffi::Py_ssize_t, kw: *mut ffi::PyObject) -> *mut ffi::PyObject {
    forward(&LOAD_WRAPPER, args, nargs, kw)
}

/// Points the C function `original` (named `name`) at `wrapper`, and returns a fresh function
/// object that still runs the original code, for the wrapper to call after its decision.
#[pyfunction]
pub fn redirect_builtin(py: Python<'_>, name: &str, original: &Bound<'_, PyAny>, wrapper: Py<PyAny>) -> PyResult<Py<PyAny>> {
    let (slot, trampoline): (&PyOnceLock<Py<PyAny>>, FastCallKeywords) = match name {
        "loads" => (&LOADS_WRAPPER, loads_trampoline),
        "load" => (&LOAD_WRAPPER, load_trampoline),
        other => return Err(pyo3::exceptions::PyValueError::new_err(format!("cannot redirect {other:?}"))),
    };
    if original.get_type().name()?.to_string() != "builtin_function_or_method" {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!("_pickle.{name} is not a C function")));
    }
    unsafe {
        let head = original.as_ptr() as *mut CFunctionHead;
        let def = (*head).m_ml;
        let def_name = if def.is_null() || (*def).name.is_null() { "" } else { CStr::from_ptr((*def).name).to_str().unwrap_or("") };
        if def_name != name || (*def).flags != METH_FASTCALL_KEYWORDS {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "_pickle.{name} does not have the layout picklegate knows (name {def_name:?}, flags {:#x})",
                if def.is_null() { 0 } else { (*def).flags }
            )));
        }
        if (*def).meth == trampoline as *mut c_void {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!("_pickle.{name} is already redirected")));
        }
        let copy = Box::into_raw(Box::new(MethodDef { name: (*def).name, meth: (*def).meth, flags: (*def).flags, doc: (*def).doc }));
        let slf = ffi::PyCFunction_GetSelf(original.as_ptr());
        let fresh = PyCFunction_NewEx(copy, slf, std::ptr::null_mut());
        let fresh = Bound::from_owned_ptr_or_err(py, fresh)?;
        slot.set(py, wrapper).map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("already redirected"))?;
        (*def).meth = trampoline as *mut c_void;
        Ok(fresh.unbind())
    }
}
