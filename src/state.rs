//! The process-wide configuration (mode, manifest, who set it) and the event log behind the
//! `log` crate, which writes JSON lines to `PICKLEGATE_LOG` and forwards them to the Python logger
//! `picklegate` (which reaches the application's root handlers only once the application configures it).

use crate::errors::Error;
use parking_lot::{Mutex, RwLock};
use picklegate_core::event::{Event, Sink};
use picklegate_core::manifest::Manifest;
use picklegate_core::policy::{
    install_conflict, install_ignored, record_file_for, settle_install, Mode, Policy, Request,
    Settlement,
};
use picklegate_core::record::RecordFile;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Who configured the gate. The environment is the operator: code may only make it stricter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `no_pickles()` switched the interposer on with no policy; any install replaces it.
    Implicit,
    Code,
    Environment,
    /// The host-wide policy file, found by the preload library listed in /etc/ld.so.preload.
    Host,
}

impl Origin {
    fn parse(text: &str) -> PyResult<Self> {
        match text {
            "implicit" => Ok(Origin::Implicit),
            "code" => Ok(Origin::Code),
            "environment" => Ok(Origin::Environment),
            "host" => Ok(Origin::Host),
            other => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown origin {other:?}"
            ))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Origin::Implicit => "implicit",
            Origin::Code => "code",
            Origin::Environment => "environment",
            Origin::Host => "host",
        }
    }
}

pub struct Gate {
    pub policy: Policy,
    pub origin: Origin,
    /// Where `record` mode appends each load.
    pub record: Option<Arc<RecordFile>>,
}

impl Gate {
    pub fn manifest(&self) -> Option<&Manifest> {
        self.policy.manifest.as_deref()
    }

    fn source(&self) -> Option<&str> {
        self.manifest().map(|m| m.source.as_str())
    }

    fn request(&self) -> Request<'_> {
        Request {
            mode: self.policy.mode,
            manifest: self.source(),
            host: self.origin == Origin::Host,
        }
    }
}

static GATE: RwLock<Option<Arc<Gate>>> = RwLock::new(None);
/// Counts installs: what was derived from an earlier gate (named callsites) is stale once it moves.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many times the gate was configured; changes whenever its manifest may have.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// The gate now in force; `None` until something installs picklegate.
pub fn current() -> Option<Arc<Gate>> {
    GATE.read().clone()
}

const UNINSTALLED: Policy = Policy {
    mode: Mode::Off,
    manifest: None,
};

pub fn policy_of(gate: &Option<Arc<Gate>>) -> &Policy {
    gate.as_ref().map_or(&UNINSTALLED, |g| &g.policy)
}

/// Sets the mode and manifest. Of two calls the stricter wins, whatever their order
/// (`policy::settle`): a library cannot undo what the operator or application set, nor keep an
/// application's later `enforce` from applying by installing something looser first.
#[pyfunction]
#[pyo3(signature = (mode, policy, origin, log=None, record=None))]
pub fn configure(
    mode: Option<&str>,
    policy: Option<&str>,
    origin: &str,
    log: Option<&str>,
    record: Option<&str>,
) -> Result<String, Error> {
    let origin = Origin::parse(origin)?;
    let mode = match mode.map(Mode::parse).transpose() {
        Ok(mode) => mode.unwrap_or(Mode::Enforce),
        Err(message) => return Err(Error::Policy(message)),
    };
    let manifest = match policy {
        Some(path) => Some(Arc::new(Manifest::load(Path::new(path))?)),
        None => None,
    };
    let record = open_record_file(mode, record)?;
    if let Some(setting) = log {
        let sink = Sink::parse(setting).map_err(|e| Error::Policy(e.to_string()))?;
        *LOGGER.sink.lock() = Some(sink);
    }
    ensure_logger();

    GENERATION.fetch_add(1, Ordering::Release);
    let mut slot = GATE.write();
    let wanted = Gate {
        policy: Policy { mode, manifest },
        origin,
        record,
    };
    let held = slot.as_ref().filter(|held| held.origin != Origin::Implicit);
    let settlement = settle_install(held.map(|h| h.request()), wanted.request());
    match (settlement, held) {
        (Settlement::Replace, _) | (_, None) => *slot = Some(Arc::new(wanted)),
        (Settlement::Unchanged, _) => {}
        (Settlement::Conflict, Some(held)) => {
            let message = install_conflict(held.request(), held.origin.as_str(), wanted.request());
            return Err(Error::Policy(message));
        }
        (Settlement::Ignored, Some(held)) => {
            let message = install_ignored(held.request(), held.origin.as_str(), wanted.request());
            log::warn!(target: "picklegate", "{}", serde_json::json!({"event": "install-ignored", "message": message}));
        }
    }
    Ok(describe(slot.as_ref()))
}

/// The record file `record` mode needs (and only it): without one, its loads would go unrecorded.
fn open_record_file(mode: Mode, path: Option<&str>) -> Result<Option<Arc<RecordFile>>, Error> {
    match record_file_for(mode, path).map_err(Error::Policy)? {
        Some(path) => match RecordFile::open(Path::new(path)) {
            Ok(file) => Ok(Some(Arc::new(file))),
            Err(e) => Err(Error::Policy(e.to_string())),
        },
        None => Ok(None),
    }
}

fn describe(gate: Option<&Arc<Gate>>) -> String {
    match gate {
        None => "picklegate: not installed".into(),
        Some(g) => format!(
            "picklegate: mode={} policy={} (set by {})",
            g.policy.mode.as_str(),
            g.source()
                .unwrap_or("<none: every load is refused in enforce>"),
            g.origin.as_str()
        ),
    }
}

/// `(mode, manifest path, origin)` of the gate in force, or `None`.
#[pyfunction]
pub fn current_state() -> Option<(String, Option<String>, String)> {
    current().map(|g| {
        (
            g.policy.mode.as_str().to_string(),
            g.source().map(str::to_string),
            g.origin.as_str().to_string(),
        )
    })
}

struct EventLogger {
    sink: Mutex<Option<Sink>>,
}

static LOGGER: EventLogger = EventLogger {
    sink: Mutex::new(None),
};
static PY_LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn ensure_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

impl log::Log for EventLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == "picklegate"
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = record.args().to_string();
        {
            let mut sink = self.sink.lock();
            let sink = sink.get_or_insert(Sink::Stderr);
            if let Err(e) = sink.write_line(&format!("{line}\n")) {
                eprintln!(
                    "picklegate: cannot write to the log {}: {e}",
                    sink.describe()
                );
            }
        }
        // A subinterpreter's own events go to the sink only: the Python logger belongs to the
        // main interpreter.
        if !in_main_interpreter() {
            return;
        }
        let level = if record.level() <= log::Level::Warn {
            30
        } else {
            20
        };
        // Every event is logged by code that holds the GIL (a decision, the audit hook, install),
        // so no PyGILState_Ensure here: inside a subinterpreter it waits for itself forever.
        // SAFETY: as just said, every caller of the logger holds the GIL.
        let py = unsafe { Python::assume_attached() };
        {
            let forwarded = PY_LOGGER
                .get_or_try_init(py, || {
                    // Imported on the first event, not at start-up. The NullHandler keeps Python's
                    // last-resort handler from printing each line a second time.
                    let logging = py.import("logging")?;
                    let logger = logging.call_method1("getLogger", ("picklegate",))?;
                    let configured = logger.getattr("handlers")?.len()? > 0
                        || logger.getattr("level")?.extract::<i64>()? != 0;
                    if !configured {
                        // The lines already went to PICKLEGATE_LOG: they reach the application's
                        // own handlers only if it asks, by giving this logger a level or a handler.
                        logger.setattr("propagate", false)?;
                    }
                    logger.call_method1("addHandler", (logging.call_method0("NullHandler")?,))?;
                    Ok::<_, PyErr>(logger.unbind())
                })
                .and_then(|logger| logger.bind(py).call_method1("log", (level, line)).map(drop));
            if let Err(e) = forwarded {
                e.write_unraisable(py, None);
            }
        }
    }

    fn flush(&self) {}
}

/// True when the thread (which holds the GIL) runs in the main interpreter.
fn in_main_interpreter() -> bool {
    // SAFETY: called with the GIL held (see `log`), so the thread has a current interpreter.
    unsafe { pyo3::ffi::PyInterpreterState_GetID(pyo3::ffi::PyInterpreterState_Get()) == 0 }
}

static OBSERVER: Mutex<Option<Py<PyAny>>> = Mutex::new(None);
/// Whether `OBSERVER` is set, read on every load without taking its lock.
static OBSERVED: AtomicBool = AtomicBool::new(false);

/// Sets (or clears, with `None`) the callable that sees every load decision as a dict, before
/// an allowed load runs. If it raises, that load does not run: an observer can only refuse more.
#[pyfunction]
pub fn set_observer(observer: Option<Py<PyAny>>) {
    let mut slot = OBSERVER.lock();
    OBSERVED.store(observer.is_some(), Ordering::Release);
    let previous = std::mem::replace(&mut *slot, observer);
    drop(slot);
    drop(previous); // outside the lock: dropping may run Python code
}

/// True when someone watches decisions (the pytest plugin): allowed loads then build events too.
pub fn has_observer() -> bool {
    OBSERVED.load(Ordering::Acquire)
}

/// Shows `event` to the observer, if one is set; its exception is the caller's to raise.
pub fn observe(py: Python<'_>, event: &Event) -> PyResult<()> {
    let Some(observer) = OBSERVER.lock().as_ref().map(|o| o.clone_ref(py)) else {
        return Ok(());
    };
    let json = py
        .import("json")?
        .call_method1("loads", (event.to_json_line(),))?;
    observer.bind(py).call1((json,)).map(drop)
}

/// Logs one decision: refusals at warning level, everything else at info.
pub fn emit(event: &Event) {
    let line = event.to_json_line();
    let line = line.trim_end();
    if matches!(event.decision, "deny" | "warn") {
        log::warn!(target: "picklegate", "{line}");
    } else {
        log::info!(target: "picklegate", "{line}");
    }
}
