//! The backstop: a PEP 578 audit hook, registered from Rust so it cannot be removed, that judges
//! every `pickle.find_class` event, catching unpicklers the interposer never saw.

use crate::errors::Error;
use crate::load::{active_approval, carry_out};
use crate::state;
use crate::tokens::current_scope;
use picklegate_core::decision::{
    decide_global, GlobalFacts, BACKSTOP_FAILED, BACKSTOP_NOT_REGISTERED,
};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ffi::PySys_AddAuditHook;

const FIND_CLASS: &[u8] = b"pickle.find_class";
const SELF_CHECK: &str = "picklegate.audit-hook-check";

static REGISTERED: AtomicBool = AtomicBool::new(false);
static SELF_CHECK_SEEN: AtomicBool = AtomicBool::new(false);

/// # Safety
/// Called by CPython only, as a PEP 578 hook: GIL held, `event` a C string, `args` a tuple.
unsafe extern "C" fn hook(event: *const c_char, args: *mut ffi::PyObject, _: *mut c_void) -> c_int {
    // SAFETY: CPython passes the event name as a NUL-terminated string that outlives the call.
    let name = unsafe { CStr::from_ptr(event) }.to_bytes();
    if name == SELF_CHECK.as_bytes() {
        SELF_CHECK_SEEN.store(true, Ordering::SeqCst);
        return 0;
    }
    if name != FIND_CLASS {
        return 0;
    }
    // SAFETY: CPython runs audit hooks with the GIL held (`PySys_Audit` requires it).
    let py = unsafe { Python::assume_attached() };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `args` is the event's argument tuple, alive for the duration of the hook.
        let args = unsafe { Bound::from_borrowed_ptr(py, args) };
        judge(py, &args)
    }));
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(err)) => {
            err.restore(py);
            -1
        }
        Err(_) => {
            PyErr::from(Error::Policy(BACKSTOP_FAILED.into())).restore(py);
            -1
        }
    }
}

fn text(obj: PyResult<Bound<'_, PyAny>>) -> String {
    match obj {
        Ok(o) => o
            .extract::<String>()
            .unwrap_or_else(|_| o.repr().map(|r| r.to_string()).unwrap_or_default()),
        Err(_) => "?".into(),
    }
}

/// Decides a global `find_class` is about to resolve (`decision::decide_global`) and carries
/// the decision out.
fn judge(py: Python<'_>, args: &Bound<'_, PyAny>) -> PyResult<()> {
    let (module, name) = (text(args.get_item(0)), text(args.get_item(1)));
    let gate = state::current();
    let scope = current_scope(py)?;
    let facts = GlobalFacts {
        policy: state::policy_of(&gate),
        scope: &scope.get().inner,
        active: active_approval(py)?,
        module: &module,
        name: &name,
    };
    let decision = decide_global(
        &facts,
        || {
            crate::callsite::current(py)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?:?".into())
        },
        || defined_there(py, &module, &name),
        || crate::load::resolved_after_approved_load(py, &module, &name),
    )?;
    carry_out(py, &gate, decision)?;
    Ok(())
}

/// Whether `module`.`name` resolves, as `find_class` is about to resolve it, to a class or a
/// function (or a callable wrapping one, such as `functools.lru_cache`) that the module itself
/// defines: its `__module__` is that module, its `__qualname__` that name. Not a module, not a
/// name the module imported, not a plain instance. A name that does not
/// resolve counts as defined, so `find_class` raises its own error for it, as it would without us.
fn defined_there(py: Python<'_>, module: &str, name: &str) -> bool {
    // A Python 2 spelling that protocols 0-2 rename (`__builtin__`, `copy_reg`, `dbm`...) resolves
    // elsewhere than it reads: a pattern never admits one.
    if renamed_by_fix_imports(py, module, name).unwrap_or(true) {
        return false;
    }
    match resolve(py, module, name) {
        Ok(Some((object, home))) => is_defined_in(py, &object, &home, name).unwrap_or(false),
        Ok(None) => true,
        Err(_) => false,
    }
}

fn renamed_by_fix_imports(py: Python<'_>, module: &str, name: &str) -> PyResult<bool> {
    let compat = match sys_modules(py)?.get_item("_compat_pickle") {
        Ok(compat) => compat,
        Err(_) => py.import("_compat_pickle")?.into_any(),
    };
    Ok(compat.getattr("IMPORT_MAPPING")?.contains(module)?
        || compat.getattr("NAME_MAPPING")?.contains((module, name))?)
}

/// `(object, its module)` as `find_class` resolves them (import, then a getattr per dotted part),
/// or `None` when they do not resolve.
fn resolve<'py>(
    py: Python<'py>,
    module: &str,
    name: &str,
) -> PyResult<Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
    let modules = sys_modules(py)?;
    let home = match modules.get_item(module) {
        Ok(home) => home,
        Err(_) => {
            if py.import(module).is_err() {
                return Ok(None);
            }
            modules.get_item(module)?
        }
    };
    let mut object = home.clone();
    for part in name.split('.') {
        match object.getattr(part) {
            Ok(next) => object = next,
            Err(_) => return Ok(None),
        }
    }
    Ok(Some((object, home)))
}

fn is_defined_in(
    py: Python<'_>,
    object: &Bound<'_, PyAny>,
    home: &Bound<'_, PyAny>,
    name: &str,
) -> PyResult<bool> {
    if object.is_instance_of::<pyo3::types::PyModule>()
        || !(object.is_callable() || object.is_instance_of::<pyo3::types::PyType>())
    {
        return Ok(false);
    }
    let qualname: String = object.getattr(intern!(py, "__qualname__"))?.extract()?;
    let defined_in = sys_modules(py)?.get_item(object.getattr(intern!(py, "__module__"))?)?;
    Ok(qualname == name && defined_in.is(home))
}

/// `sys.modules` of the running interpreter, without going through the import machinery.
fn sys_modules(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    // SAFETY: the GIL is held (`py`); the name is a C string; the result is borrowed from `sys`.
    let modules = unsafe { ffi::PySys_GetObject(c"modules".as_ptr()) };
    if modules.is_null() {
        return Err(Error::Policy("sys.modules is missing".into()).into());
    }
    // SAFETY: non-null (checked), and `sys` holds it while this borrow (tied to `py`) is used.
    Ok(unsafe { Bound::from_borrowed_ptr(py, modules) })
}

/// Registers the hook once and proves it runs (another hook may veto `sys.addaudithook`).
#[pyfunction]
pub fn install_backstop(py: Python<'_>) -> Result<(), Error> {
    let first = !REGISTERED.swap(true, Ordering::SeqCst);
    // SAFETY: the GIL is held (`py`); `hook` is a `Py_AuditHookFunction` that needs no user data
    // and stays valid for the life of the process (this library is never unloaded by CPython).
    if first && unsafe { PySys_AddAuditHook(hook, std::ptr::null_mut()) } != 0 {
        return Err(PyErr::take(py).map_or_else(
            || Error::Policy("PySys_AddAuditHook failed".into()),
            Error::Python,
        ));
    }
    py.import("sys")?.call_method1("audit", (SELF_CHECK,))?;
    if !SELF_CHECK_SEEN.load(Ordering::SeqCst) {
        return Err(Error::Policy(BACKSTOP_NOT_REGISTERED.into()));
    }
    Ok(())
}
