//! The five CPython functions picklegate needs beyond the 3.9 stable ABI, looked up in the running
//! interpreter when `_core` loads: the abi3 wheel then links stable-ABI symbols only (abi3audit).
//!
//! Each is public C API, exported under this name and signature by every CPython from 3.8 on
//! (the buffer pair joined the limited API in 3.11, the other two are in none). A missing one
//! fails the import with its name, never a load.

#![allow(non_snake_case)]

use pyo3::exceptions::PyImportError;
use pyo3::ffi;
use pyo3::PyResult;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// A PEP 578 audit hook, as `PySys_AddAuditHook` takes it.
pub type AuditHook = unsafe extern "C" fn(*const c_char, *mut ffi::PyObject, *mut c_void) -> c_int;

struct Api {
    add_audit_hook: unsafe extern "C" fn(AuditHook, *mut c_void) -> c_int,
    context_var_get: unsafe extern "C" fn(
        *mut ffi::PyObject,
        *mut ffi::PyObject,
        *mut *mut ffi::PyObject,
    ) -> c_int,
    get_buffer: unsafe extern "C" fn(*mut ffi::PyObject, *mut c_void, c_int) -> c_int,
    buffer_release: unsafe extern "C" fn(*mut c_void),
    frame_get_code: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject,
}

static API: OnceLock<Api> = OnceLock::new();

/// The address of `name` in the interpreter: the global scope first (a shared libpython, or an
/// executable that exports its symbols), then the object that holds a stable-ABI function.
fn lookup(name: &CStr) -> Option<*mut c_void> {
    unsafe {
        let found = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if !found.is_null() {
            return Some(found);
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(ffi::PyLong_FromLong as *const c_void, &mut info) == 0
            || info.dli_fname.is_null()
        {
            return None;
        }
        let handle = libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let found = libc::dlsym(handle, name.as_ptr());
        libc::dlclose(handle);
        (!found.is_null()).then_some(found)
    }
}

/// Finds the five functions; called first thing when `_core` is imported.
pub fn load() -> PyResult<()> {
    if API.get().is_some() {
        return Ok(());
    }
    const NAMES: [&[u8]; 5] = [
        b"PySys_AddAuditHook\0",
        b"PyContextVar_Get\0",
        b"PyObject_GetBuffer\0",
        b"PyBuffer_Release\0",
        b"PyFrame_GetCode\0",
    ];
    let mut found = [std::ptr::null_mut(); 5];
    let mut missing = Vec::new();
    for (slot, name) in found.iter_mut().zip(NAMES) {
        let name = CStr::from_bytes_with_nul(name).expect("names end with NUL");
        match lookup(name) {
            Some(address) => *slot = address,
            None => missing.push(name.to_string_lossy().into_owned()),
        }
    }
    if !missing.is_empty() {
        return Err(PyImportError::new_err(format!(
            "picklegate: this Python does not export {} (CPython 3.9 or later is needed)",
            missing.join(", ")
        )));
    }
    // SAFETY: each address is the C function of that name, whose signature CPython keeps.
    let api = unsafe {
        Api {
            add_audit_hook: std::mem::transmute::<*mut c_void, _>(found[0]),
            context_var_get: std::mem::transmute::<*mut c_void, _>(found[1]),
            get_buffer: std::mem::transmute::<*mut c_void, _>(found[2]),
            buffer_release: std::mem::transmute::<*mut c_void, _>(found[3]),
            frame_get_code: std::mem::transmute::<*mut c_void, _>(found[4]),
        }
    };
    let _ = API.set(api);
    Ok(())
}

fn api() -> &'static Api {
    API.get().expect("capi::load runs when _core is imported")
}

/// `PySys_AddAuditHook`.
pub unsafe fn PySys_AddAuditHook(hook: AuditHook, user_data: *mut c_void) -> c_int {
    (api().add_audit_hook)(hook, user_data)
}

/// `PyContextVar_Get`.
pub unsafe fn PyContextVar_Get(
    var: *mut ffi::PyObject,
    default: *mut ffi::PyObject,
    value: *mut *mut ffi::PyObject,
) -> c_int {
    (api().context_var_get)(var, default, value)
}

/// `PyObject_GetBuffer`, into the caller's `Py_buffer`.
pub unsafe fn PyObject_GetBuffer<View>(
    obj: *mut ffi::PyObject,
    view: *mut View,
    flags: c_int,
) -> c_int {
    (api().get_buffer)(obj, view.cast(), flags)
}

/// `PyBuffer_Release`.
pub unsafe fn PyBuffer_Release<View>(view: *mut View) {
    (api().buffer_release)(view.cast())
}

/// `PyFrame_GetCode` (CPython 3.9+; in the limited API only from 3.10): a frame's code, as a new
/// reference, without the `object.__getattr__` audit event that reading `frame.f_code` raises.
pub unsafe fn PyFrame_GetCode(frame: *mut ffi::PyObject) -> *mut ffi::PyObject {
    (api().frame_get_code)(frame)
}
