//! The binding's one error type: every failure it raises on its own account, `From` each core error,
//! and the one conversion to the Python exception users see (classes of `picklegate._errors`).
//! The classes live in Python because the load refusals must subclass `pickle.UnpicklingError`.

use picklegate_core::decision::{Denial, ErrorKind};
use picklegate_core::manifest::ManifestError;
use picklegate_core::policy::{BadOnlyObject, BadToken};
use picklegate_core::record::RecordError;
use picklegate_core::scan::ScanError;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;

/// The exception classes of `picklegate._errors` (SPEC.md, "Errors"), imported on first use.
mod python {
    pyo3::import_exception!(picklegate._errors, PickleDeniedError);
    pyo3::import_exception!(picklegate._errors, NoPickleError);
    pyo3::import_exception!(picklegate._errors, BadTokenError);
    pyo3::import_exception!(picklegate._errors, PolicyError);
    pyo3::import_exception!(picklegate._errors, ScanError);
}

/// Everything the binding raises; each variant is one Python exception class.
#[derive(Debug)]
pub enum Error {
    /// The policy or a setting cannot be used: `PolicyError`.
    Policy(String),
    /// A manifest that cannot be used: `PolicyError` with its `file`, `line` and `column`.
    Manifest(ManifestError),
    /// A record file that cannot be frozen: `PolicyError` with its `file` and `line`.
    Record(RecordError),
    /// `allow_pickles()` refused a token, as the core decided: `BadTokenError`.
    BadToken(BadToken),
    /// An `only_objects` entry that is not a sha256, as the core parses them: `ValueError`.
    OnlyObjects(BadOnlyObject),
    /// A load or global refused as the core decided: `PickleDeniedError` (the operator's policy)
    /// or `NoPickleError` (the code's own `no_pickles()`), with its callsite, sha256 and size.
    Refused(Denial),
    /// The bytes are not a well-formed pickle: `ScanError`.
    Scan(ScanError),
    /// Reading a file failed: `OSError` with the system's message.
    Io(std::io::Error),
    /// Reading the file at `path` failed: `OSError` naming it.
    File {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    /// An exception Python code raised, passed on as it is.
    Python(PyErr),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message the exception carries: what users read.
    pub fn message(&self) -> String {
        match self {
            Error::Policy(message) => message.clone(),
            Error::Refused(denial) => denial.message.clone(),
            Error::Manifest(e) => e.to_string(),
            Error::Record(e) => e.to_string(),
            Error::BadToken(e) => e.to_string(),
            Error::OnlyObjects(e) => e.to_string(),
            Error::Scan(e) => e.to_string(),
            Error::Io(e) => e.to_string(),
            Error::File { path, error } => format!("{}: {error}", path.display()),
            Error::Python(e) => e.to_string(),
        }
    }

    /// Where a `PolicyError` points: file, line and column, each when known.
    fn location(&self) -> (Option<String>, Option<usize>, Option<usize>) {
        match self {
            Error::Manifest(ManifestError::Unreadable { file, .. }) => {
                (Some(file.clone()), None, None)
            }
            Error::Manifest(ManifestError::Invalid {
                file, line, column, ..
            }) => (Some(file.clone()), Some(*line), Some(*column)),
            Error::Record(RecordError { file, line, .. }) => {
                (Some(file.clone()), (*line != 0).then_some(*line), None)
            }
            _ => (None, None, None),
        }
    }
}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        if let Error::Python(err) = error {
            return err;
        }
        let message = error.message();
        match error {
            Error::Policy(_) | Error::Manifest(_) | Error::Record(_) => {
                let (file, line, column) = error.location();
                python::PolicyError::new_err((message, file, line, column))
            }
            Error::BadToken(_) => python::BadTokenError::new_err(message),
            Error::Refused(denial) => {
                let facts = (message, denial.callsite, denial.sha256, denial.size);
                match denial.kind {
                    ErrorKind::PickleDenied => python::PickleDeniedError::new_err(facts),
                    ErrorKind::NoPickle => python::NoPickleError::new_err(facts),
                }
            }
            Error::OnlyObjects(_) => PyValueError::new_err(message),
            Error::Scan(_) => python::ScanError::new_err(message),
            Error::Io(_) | Error::File { .. } => PyOSError::new_err(message),
            Error::Python(err) => err, // returned above
        }
    }
}

impl From<PyErr> for Error {
    fn from(err: PyErr) -> Self {
        Error::Python(err)
    }
}

/// `From` each failure that is one variant of `Error` as it is.
macro_rules! variant_from {
    ($($variant:ident($source:ty)),* $(,)?) => {$(
        impl From<$source> for Error {
            fn from(e: $source) -> Self {
                Error::$variant(e)
            }
        }
    )*};
}

variant_from!(
    Refused(Denial),
    Manifest(ManifestError),
    Record(RecordError),
    BadToken(BadToken),
    OnlyObjects(BadOnlyObject),
    Scan(ScanError),
    Io(std::io::Error),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_error_keeps_file_line_and_column() {
        let error = Error::from(ManifestError::Invalid {
            file: "policy.toml".into(),
            line: 3,
            column: 7,
            message: "unknown key `sha`".into(),
        });
        assert_eq!(error.message(), "policy.toml:3:7: unknown key `sha`");
        assert_eq!(
            error.location(),
            (Some("policy.toml".into()), Some(3), Some(7))
        );
        let unreadable = Error::from(ManifestError::Unreadable {
            file: "gone.toml".into(),
            reason: "No such file".into(),
        });
        assert_eq!(
            unreadable.location(),
            (Some("gone.toml".into()), None, None)
        );
    }

    #[test]
    fn a_record_error_keeps_file_and_line_but_not_line_zero() {
        let at_line = Error::from(RecordError {
            file: "r.jsonl".into(),
            line: 2,
            message: "not JSON".into(),
        });
        assert_eq!(at_line.message(), "r.jsonl:2: not JSON");
        assert_eq!(at_line.location(), (Some("r.jsonl".into()), Some(2), None));
        let whole_file = Error::from(RecordError {
            file: "r.jsonl".into(),
            line: 0,
            message: "empty".into(),
        });
        assert_eq!(whole_file.message(), "r.jsonl: empty");
        assert_eq!(whole_file.location(), (Some("r.jsonl".into()), None, None));
    }

    #[test]
    fn messages_name_the_file_or_entry_at_fault() {
        let error = Error::File {
            path: "/x/model.pkl".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(
            error.message().starts_with("/x/model.pkl: "),
            "{}",
            error.message()
        );
        assert_eq!(Error::Policy("p".into()).location(), (None, None, None));
    }
}
