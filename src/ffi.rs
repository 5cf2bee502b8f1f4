//! Everything the binding declares by hand about CPython, each with the versions it was checked on:
//! five C functions beyond the 3.9 stable ABI (looked up at run time) and private object layouts.
//!
//! The look-ups keep the abi3 wheel linked to stable-ABI symbols only (abi3audit). Each function is
//! public C API, exported under this name and signature by every CPython from 3.9 on (the buffer
//! pair joined the limited API in 3.11, `PyFrame_GetCode` in 3.10, the other two are in none). A
//! missing one fails the import of `_core` with its name, never a load. Checked on CPython 3.9,
//! 3.10, 3.11, 3.12, 3.13, 3.14.

#![allow(non_snake_case)]

use pyo3::exceptions::PyImportError;
use pyo3::ffi;
use pyo3::PyResult;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

// ---- The five functions looked up at run time -------------------------------------------------

/// A PEP 578 audit hook, as `PySys_AddAuditHook` takes it (`Py_AuditHookFunction`, 3.8 to 3.14).
pub type AuditHook = unsafe extern "C" fn(*const c_char, *mut ffi::PyObject, *mut c_void) -> c_int;

// The signatures, from `Include/cpython/sysmodule.h`, `Include/cpython/context.h` (`Include/context.h`
// before 3.13), `Include/cpython/abstract.h`, `Include/pybuffer.h` and `Include/pyframe.h`: the same
// from 3.9 (where `PyFrame_GetCode` appeared) to 3.14.
type AddAuditHookFn = unsafe extern "C" fn(AuditHook, *mut c_void) -> c_int;
type ContextVarGetFn =
    unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject, *mut *mut ffi::PyObject) -> c_int;
type GetBufferFn = unsafe extern "C" fn(*mut ffi::PyObject, *mut Py_buffer, c_int) -> c_int;
type BufferReleaseFn = unsafe extern "C" fn(*mut Py_buffer);
type FrameGetCodeFn = unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject;

struct Api {
    add_audit_hook: AddAuditHookFn,
    context_var_get: ContextVarGetFn,
    get_buffer: GetBufferFn,
    buffer_release: BufferReleaseFn,
    frame_get_code: FrameGetCodeFn,
}

static API: OnceLock<Api> = OnceLock::new();

const NAMES: [&CStr; 5] = [
    c"PySys_AddAuditHook",
    c"PyContextVar_Get",
    c"PyObject_GetBuffer",
    c"PyBuffer_Release",
    c"PyFrame_GetCode",
];

/// The address of `name` in the interpreter: the global scope first (a shared libpython, or an
/// executable that exports its symbols), then the object that holds a stable-ABI function.
fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `name` is NUL-terminated; `dlsym` on RTLD_DEFAULT only reads the loaded objects' tables.
    let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if !found.is_null() {
        return Some(found);
    }
    // SAFETY: `Dl_info` is plain pointers and integers, for which all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `PyLong_FromLong` is linked into this library, so its address lies in a loaded
    // object; `info` is a valid, writable `Dl_info`.
    let resolved = unsafe { libc::dladdr(ffi::PyLong_FromLong as *const c_void, &mut info) };
    if resolved == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: `dli_fname` is the NUL-terminated path dladdr just returned; RTLD_NOLOAD only takes
    // a new reference to an object already loaded, it never runs a constructor.
    let handle = unsafe { libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: `handle` was returned by dlopen above and is closed exactly once, after the look-up;
    // the object stays loaded (the interpreter holds it), so the address stays valid.
    let found = unsafe {
        let found = libc::dlsym(handle, name.as_ptr());
        libc::dlclose(handle);
        found
    };
    (!found.is_null()).then_some(found)
}

/// Finds the five functions; called first thing when `_core` is imported.
pub fn load() -> PyResult<()> {
    if API.get().is_some() {
        return Ok(());
    }
    let mut found = [std::ptr::null_mut(); NAMES.len()];
    let mut missing = Vec::new();
    for (slot, name) in found.iter_mut().zip(NAMES) {
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
    // SAFETY: each address is the exported C function named in `NAMES` at that index, non-null,
    // whose signature CPython has kept since 3.9 as declared above (a `*mut Py_buffer` is the
    // `Py_buffer *` it takes, a `*mut PyObject` the `PyFrameObject *`).
    let api = unsafe {
        Api {
            add_audit_hook: std::mem::transmute::<*mut c_void, AddAuditHookFn>(found[0]),
            context_var_get: std::mem::transmute::<*mut c_void, ContextVarGetFn>(found[1]),
            get_buffer: std::mem::transmute::<*mut c_void, GetBufferFn>(found[2]),
            buffer_release: std::mem::transmute::<*mut c_void, BufferReleaseFn>(found[3]),
            frame_get_code: std::mem::transmute::<*mut c_void, FrameGetCodeFn>(found[4]),
        }
    };
    let _ = API.set(api);
    Ok(())
}

fn api() -> &'static Api {
    API.get().expect("ffi::load runs when _core is imported")
}

/// `PySys_AddAuditHook`.
///
/// # Safety
/// The caller holds the GIL (or calls before `Py_Initialize`); `hook` may run on any audit event
/// from now on, for the life of the process.
pub unsafe fn PySys_AddAuditHook(hook: AuditHook, user_data: *mut c_void) -> c_int {
    // SAFETY: the function was looked up by this name at import; the caller upholds its contract.
    unsafe { (api().add_audit_hook)(hook, user_data) }
}

/// `PyContextVar_Get`.
///
/// # Safety
/// The caller holds the GIL; `var` is a `ContextVar`, `default` null or an object, `value` writable.
pub unsafe fn PyContextVar_Get(
    var: *mut ffi::PyObject,
    default: *mut ffi::PyObject,
    value: *mut *mut ffi::PyObject,
) -> c_int {
    // SAFETY: the function was looked up by this name at import; the caller upholds its contract.
    unsafe { (api().context_var_get)(var, default, value) }
}

/// `PyObject_GetBuffer`, into the caller's `Py_buffer`.
///
/// # Safety
/// The caller holds the GIL; `obj` is a live object and `view` a writable `Py_buffer`, which the
/// caller later gives to `PyBuffer_Release` exactly once if this returns 0.
pub unsafe fn PyObject_GetBuffer(
    obj: *mut ffi::PyObject,
    view: *mut Py_buffer,
    flags: c_int,
) -> c_int {
    // SAFETY: the function was looked up by this name at import; the caller upholds its contract.
    unsafe { (api().get_buffer)(obj, view, flags) }
}

/// `PyBuffer_Release`.
///
/// # Safety
/// The caller holds the GIL; `view` was filled by a successful `PyObject_GetBuffer` and is not
/// released twice.
pub unsafe fn PyBuffer_Release(view: *mut Py_buffer) {
    // SAFETY: the function was looked up by this name at import; the caller upholds its contract.
    unsafe { (api().buffer_release)(view) }
}

/// `PyFrame_GetCode`: a frame's code, as a new reference (never null), without the
/// `object.__getattr__` audit event that reading `frame.f_code` raises.
///
/// # Safety
/// The caller holds the GIL and `frame` is a live frame object.
pub unsafe fn PyFrame_GetCode(frame: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the function was looked up by this name at import; the caller upholds its contract.
    unsafe { (api().frame_get_code)(frame) }
}

// ---- Py_buffer ---------------------------------------------------------------------------------

/// `Py_buffer` (`Include/pybuffer.h`, `Include/object.h` before 3.11): unchanged since 3.3, checked
/// on 3.9 to 3.14. pyo3 declares it for the limited API only from 3.11.
#[repr(C)]
pub struct Py_buffer {
    pub buf: *mut c_void,
    pub obj: *mut ffi::PyObject,
    pub len: ffi::Py_ssize_t,
    pub itemsize: ffi::Py_ssize_t,
    pub readonly: c_int,
    pub ndim: c_int,
    pub format: *mut c_char,
    pub shape: *mut ffi::Py_ssize_t,
    pub strides: *mut ffi::Py_ssize_t,
    pub suboffsets: *mut ffi::Py_ssize_t,
    pub internal: *mut c_void,
}

/// `PyBUF_SIMPLE` and `PyBUF_WRITABLE`, the same values 3.9 to 3.14.
pub const PYBUF_SIMPLE: c_int = 0;
pub const PYBUF_WRITABLE: c_int = 0x0001;

// ---- Method definitions and the objects that hold them ----------------------------------------

/// `PyMethodDef` (`Include/methodobject.h`): name, C function, flags, doc, unchanged 3.9 to 3.14.
/// `meth` is an untyped pointer here: its real type depends on `flags`.
#[repr(C)]
pub struct MethodDef {
    pub name: *const c_char,
    pub meth: *mut c_void,
    pub flags: c_int,
    pub doc: *const c_char,
}

/// The head of `PyCFunctionObject` (`Include/cpython/methodobject.h`): `PyObject_HEAD`, then the
/// `PyMethodDef *`. Checked on 3.9 to 3.14, default (GIL) builds: a free-threaded build's object
/// head is larger, and its `abi3` is not this wheel's.
#[repr(C)]
pub struct CFunctionHead {
    pub ob_refcnt: ffi::Py_ssize_t,
    pub ob_type: *mut ffi::PyTypeObject,
    pub m_ml: *mut MethodDef,
}

/// The head of `PyMethodDescrObject` (`Include/descrobject.h`, `PyDescr_COMMON` then the method),
/// checked on 3.9 to 3.14, default builds.
#[repr(C)]
pub struct MethodDescrHead {
    pub ob_refcnt: ffi::Py_ssize_t,
    pub ob_type: *mut ffi::PyTypeObject,
    pub d_type: *mut ffi::PyTypeObject,
    pub d_name: *mut ffi::PyObject,
    pub d_qualname: *mut ffi::PyObject,
    pub d_method: *mut MethodDef,
}

/// The calling-convention flags of `PyMethodDef.ml_flags`, the same values 3.9 to 3.14.
pub const METH_KEYWORDS: c_int = 0x0002;
pub const METH_NOARGS: c_int = 0x0004;
pub const METH_FASTCALL: c_int = 0x0080;
pub const METH_METHOD: c_int = 0x0200;

/// `PyCFunction` as METH_NOARGS uses it: `(self, NULL)`.
pub type NoArgs =
    unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;

/// `_PyCFunctionFastWithKeywords` (METH_FASTCALL|METH_KEYWORDS): `(self, args, nargs, kwnames)`.
pub type FastCallKeywords = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

/// `PyCMethod` (METH_METHOD|METH_FASTCALL|METH_KEYWORDS, 3.9 to 3.14): a method that is also
/// given the class that defined it (Argument Clinic's `defining_class`).
pub type DefiningClassFastCall = unsafe extern "C" fn(
    *mut ffi::PyObject,
    *mut ffi::PyTypeObject,
    *const *mut ffi::PyObject,
    ffi::Py_ssize_t,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;

// ---- Fields of `_pickle`'s UnpicklerObject ------------------------------------------------------

/// Where the machine word at byte `offset` inside `obj` is. The offsets of `UnpicklerObject`'s
/// fields are not declared per version: `unpickler::learn_unpickler_layout` finds them by value
/// in a probe (checked on 3.9 to 3.14, including the FRAME fields of 3.13.15 and 3.14.7). Reading
/// or writing through the pointer is for the caller to justify: the offset must lie within the
/// object's `tp_basicsize`, word-aligned, with the object alive and the GIL held.
pub fn word(obj: *mut ffi::PyObject, offset: usize) -> *mut usize {
    obj.cast::<u8>().wrapping_add(offset).cast::<usize>()
}
