//! The token API's objects: `Token`, which Python code cannot construct, and `Scope`, the
//! immutable narrowing stack that `picklegate._scope` keeps in a context variable.

use crate::errors::Error;
use picklegate_core::policy::{parse_only_objects, BadToken, Origin, Scope, TokenFacts};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
static SCOPE_VAR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

use crate::ffi::PyContextVar_Get;

/// The context variable that holds the scope (`picklegate._scope.SCOPE`), made once: the binding
/// reads it on every load, so the Python layer never passes the scope down.
#[pyfunction]
pub fn scope_var(py: Python<'_>) -> PyResult<Py<PyAny>> {
    SCOPE_VAR
        .get_or_try_init(py, || {
            let open = Bound::new(py, ScopeObj::new())?;
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("default", open)?;
            py.import("contextvars")?
                .getattr("ContextVar")?
                .call(("picklegate_scope",), Some(&kwargs))
                .map(Bound::unbind)
        })
        .map(|var| var.clone_ref(py))
}

/// The scope of the running context; the open scope before anything was registered.
pub fn current_scope(py: Python<'_>) -> PyResult<Bound<'_, ScopeObj>> {
    let Some(var) = SCOPE_VAR.get(py) else {
        return Bound::new(py, ScopeObj::new());
    };
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: the GIL is held (`py`); `var` is the `ContextVar` `picklegate._scope` registered,
    // alive in `SCOPE_VAR`; a null default is allowed; `value` is writable.
    if unsafe { PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &mut value) } != 0 {
        return Err(PyErr::fetch(py));
    }
    if value.is_null() {
        return Bound::new(py, ScopeObj::new());
    }
    // SAFETY: on success `PyContextVar_Get` stores a new reference (checked non-null above).
    let value = unsafe { Bound::from_owned_ptr(py, value) };
    value.cast_into::<ScopeObj>().map_err(PyErr::from)
}

/// The proof that a piece of code opened a `no_pickles()` block. Only that block's code has it.
#[pyclass(frozen, module = "picklegate")]
pub struct Token {
    id: u64,
    origin: Origin,
    open: AtomicBool,
}

#[pymethods]
impl Token {
    fn __repr__(&self) -> String {
        let state = if self.open.load(Ordering::Acquire) {
            "open"
        } else {
            "finished"
        };
        format!("<picklegate.Token #{} ({state})>", self.id)
    }
}

/// Makes the token of a new `no_pickles()` block, bound to the thread and task that made it.
#[pyfunction]
pub fn new_token(thread: u64, task: u64) -> Token {
    Token {
        id: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
        origin: Origin { thread, task },
        open: AtomicBool::new(true),
    }
}

/// Marks a token's block as finished: the token opens nothing from now on.
#[pyfunction]
pub fn close_token(token: PyRef<'_, Token>) {
    token.open.store(false, Ordering::Release);
}

#[pyclass(frozen, module = "picklegate._core", name = "Scope")]
pub struct ScopeObj {
    pub inner: Scope,
}

#[pymethods]
impl ScopeObj {
    /// The open scope: nothing narrowed.
    #[new]
    fn new() -> Self {
        ScopeObj {
            inner: Scope::default(),
        }
    }

    #[getter]
    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    fn no_pickles(&self, token: PyRef<'_, Token>) -> ScopeObj {
        ScopeObj {
            inner: self.inner.no_pickles(token.id),
        }
    }

    /// The scope inside `allow_pickles(token, only_objects)`, or `BadTokenError`.
    #[pyo3(signature = (token, thread, task, only_objects=None))]
    fn allow(
        &self,
        token: &Bound<'_, PyAny>,
        thread: u64,
        task: u64,
        only_objects: Option<Vec<String>>,
    ) -> Result<ScopeObj, Error> {
        let Ok(token) = token.cast::<Token>() else {
            let repr = token.repr().ok().map(|r| r.to_string());
            return Err(BadToken::NotAToken { repr }.into());
        };
        let token = token.get();
        let only = only_objects
            .as_deref()
            .map(parse_only_objects)
            .transpose()?;
        let facts = TokenFacts {
            id: token.id,
            origin: token.origin,
            open: token.open.load(Ordering::Acquire),
        };
        let inner = self.inner.allow(facts, Origin { thread, task }, only)?;
        Ok(ScopeObj { inner })
    }
}
