//! Maps each core error to exactly one Python exception class from `picklegate._errors`.
//! The classes live in Python because two of them must subclass `pickle.UnpicklingError`.

use picklegate_core::manifest::ManifestError;
use picklegate_core::policy::BadToken;
use picklegate_core::scan::ScanError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn raise(
    py: Python<'_>,
    class: &str,
    message: String,
    details: &[(&str, Option<String>)],
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module =
            ERRORS.get_or_try_init(py, || py.import("picklegate._errors").map(Bound::unbind))?;
        let cls = module.bind(py).getattr(class)?;
        let kwargs = PyDict::new(py);
        for (key, value) in details {
            kwargs.set_item(key, value)?;
        }
        Ok(PyErr::from_value(cls.call((message,), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| e)
}

pub fn policy_error(py: Python<'_>, message: String) -> PyErr {
    raise(py, "PolicyError", message, &[])
}

pub fn manifest_error(py: Python<'_>, err: &ManifestError) -> PyErr {
    policy_error(py, err.to_string())
}

pub fn bad_token(py: Python<'_>, err: &BadToken) -> PyErr {
    raise(
        py,
        "BadTokenError",
        format!("allow_pickles() refused the token: {err}"),
        &[],
    )
}

pub fn bad_token_message(py: Python<'_>, message: String) -> PyErr {
    raise(py, "BadTokenError", message, &[])
}

/// The facts every refusal carries, as exception attributes.
pub struct RefusalFacts {
    pub callsite: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

impl RefusalFacts {
    fn details(&self) -> [(&'static str, Option<String>); 3] {
        [
            ("callsite", Some(self.callsite.clone())),
            ("sha256", self.sha256.clone()),
            ("size", self.size.map(|s| s.to_string())),
        ]
    }
}

pub fn pickle_denied(py: Python<'_>, message: String, facts: &RefusalFacts) -> PyErr {
    raise(py, "PickleDeniedError", message, &facts.details())
}

pub fn no_pickle(py: Python<'_>, message: String, facts: &RefusalFacts) -> PyErr {
    raise(py, "NoPickleError", message, &facts.details())
}

pub fn scan_error(py: Python<'_>, err: &ScanError) -> PyErr {
    scan_error_message(py, err.to_string())
}

pub fn scan_error_message(py: Python<'_>, message: String) -> PyErr {
    raise(py, "ScanError", message, &[])
}
