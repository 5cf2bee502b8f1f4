//! The one decision point every interposed load goes through: hash the bytes, judge them
//! against the policy and the scope, log, then run the real unpickler on those same bytes.

use crate::buffer::Bytes;
use crate::callsite;
use crate::errors::{self, RefusalFacts};
use crate::file::HashedFile;
use crate::state::{self, emit};
use crate::tokens::{current_scope, ScopeObj};
use crate::unpickler;
use picklegate_core::container::scan_all;
use picklegate_core::event::Event;
use picklegate_core::hash::Digest;
use picklegate_core::manifest::Manifest;
use picklegate_core::policy::{Action, Approval, Judgement, Load, Mode, Refusal, ScopeRefusal};
use picklegate_core::record::Record;
use picklegate_core::risk::classify;
use picklegate_core::scan::{self, Report, ScanError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Hashing this much or more releases the GIL (only for immutable buffers).
const DETACH_THRESHOLD: usize = 1 << 20;

/// What runs on this thread: a pickle load picklegate approved, or a loader library's call on a
/// whole file (torch.load, joblib.load...) whose inner pickle loads are judged as that file.
#[derive(Clone)]
pub enum Frame {
    Load(Approval),
    Container(Rc<Container>),
}

/// A file a loader library reads: judged once, on the whole file's hash, by its first pickle
/// load (or at once when `eager`), and that verdict covers the loads it makes directly.
pub struct Container {
    data: Content,
    sha: Digest,
    callsite: String,
    source: Option<String>,
    scope: Py<ScopeObj>,
    settled: Cell<Option<Approval>>,
}

/// A container's bytes: a bytes-like object, or a file pinned by `PinnedFile`.
enum Content {
    Buffer(Py<PyAny>),
    Pinned(std::sync::Arc<crate::file::Pinned>),
    /// Judged before it is read (it gives its pages back as the unpickler consumes them).
    Hashed(Py<HashedFile>),
}

thread_local! {
    /// The loads and containers now running on this thread, innermost last.
    static ACTIVE: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

fn innermost() -> Option<Frame> {
    ACTIVE.with(|a| a.borrow().last().cloned())
}

/// The approval the backstop applies to a global resolved now, if a decided load is running.
pub fn active_approval(py: Python<'_>) -> PyResult<Option<Approval>> {
    match innermost() {
        None => Ok(None),
        Some(Frame::Load(approval)) => Ok(Some(approval)),
        Some(Frame::Container(container)) => settle(py, &container).map(Some),
    }
}

struct Running;

impl Running {
    fn enter(frame: Frame) -> Self {
        ACTIVE.with(|a| a.borrow_mut().push(frame));
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().pop());
    }
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the scan of the bytes of a load found, whatever carries the pickles (a torch zip, a
/// joblib file, an .npz): every global with its class, and whether the scan read it all.
struct Found {
    globals: Vec<String>,
    classes: Vec<String>,
    complete: bool,
}

fn found_in(bytes: &[u8]) -> Found {
    let scanned = scan_all(bytes);
    let mut seen: Vec<&(String, String)> = Vec::new();
    for global in scanned
        .contents
        .parts
        .iter()
        .flat_map(|p| &p.report.globals)
    {
        if !seen.contains(&global) {
            seen.push(global);
        }
    }
    Found {
        globals: seen.iter().map(|(m, n)| format!("{m}.{n}")).collect(),
        classes: seen
            .iter()
            .map(|(m, n)| classify(m, n).0.as_str().to_string())
            .collect(),
        complete: scanned.error.is_none()
            && scanned
                .contents
                .parts
                .iter()
                .all(|p| p.report.unresolved.is_empty()),
    }
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings always serialize")
}

/// What a refusal message tells the user to add.
/// `globals` is `None` when the scan did not read the whole pickle: the entry then has no
/// `globals` key (which admits any), never `globals = []` (which admits none).
fn suggestion(
    refusal: &Refusal,
    manifest: Option<&Manifest>,
    sha: &Digest,
    callsite: &str,
    globals: Option<&[String]>,
) -> String {
    let target = manifest.map_or("a manifest (PICKLEGATE_POLICY)".to_string(), |m| {
        m.source.clone()
    });
    match refusal {
        Refusal::UntrustedGlobal { global, .. } => format!(
            "If {global} is safe for this transport, add it to that rule's globals in {target}."
        ),
        Refusal::Unscannable { .. } => {
            "A trusted transport's pickle must be scannable; list it by sha256 instead.".into()
        }
        _ => {
            let globals = globals.map_or(String::new(), |globals| {
                format!(
                    "globals = [{}]\n",
                    globals
                        .iter()
                        .map(|g| toml_string(g))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            format!(
                "To allow it after review, add to {target}:\n\n[[allow]]\nsha256 = \"{sha}\"\ncallsite = {}\nnote = \"reviewed by ...\"\n{globals}",
                toml_string(callsite)
            )
        }
    }
}

/// The record-file line of a load that `record` mode lets run.
fn record_of(event: &Event, found: Found) -> Record {
    Record {
        time: event.time,
        pid: event.pid,
        callsite: event.callsite.clone(),
        sha256: event.sha256.clone().unwrap_or_default(),
        size: event.size.unwrap_or_default(),
        globals: found.globals,
        classes: found.classes,
        globals_complete: found.complete,
        source: event.source.clone(),
    }
}

/// A refusal is raised whatever the observer does; an observer that fails is reported.
fn observe_refusal(py: Python<'_>, event: &Event) {
    if let Err(error) = state::observe(py, event) {
        error.write_unraisable(py, None);
    }
}

/// The facts of one decision: the bytes (for the scan), their hash, and where they were loaded.
struct Facts<'a> {
    /// The bytes to scan for globals; empty when the load is refused unread.
    bytes: &'a [u8],
    size: u64,
    sha: Digest,
    callsite: &'a str,
    source: Option<&'a str>,
}

fn hash(py: Python<'_>, data: &Bound<'_, PyAny>, slice: &[u8]) -> Digest {
    if slice.len() >= DETACH_THRESHOLD && data.is_instance_of::<pyo3::types::PyBytes>() {
        py.detach(|| Digest::of(slice))
    } else {
        Digest::of(slice)
    }
}

thread_local! {
    /// The live unpickler whose next load is being judged: its memo holds earlier loads' objects.
    static LIVE_UNPICKLER: RefCell<Option<Py<PyAny>>> = const { RefCell::new(None) };
}

/// Marks, until dropped, that the load about to be decided runs on `unpickler` (red-team S2: a
/// reused unpickler's memo reaches an earlier load's objects; the scan must number after them).
pub struct LiveUnpickler;

impl LiveUnpickler {
    pub fn enter(unpickler: &Bound<'_, PyAny>) -> Self {
        LIVE_UNPICKLER.with(|u| *u.borrow_mut() = Some(unpickler.clone().unbind()));
        LiveUnpickler
    }

    /// Before a load runs undecided (`decide` takes the mark otherwise).
    fn forget() {
        LIVE_UNPICKLER.with(|u| u.borrow_mut().take());
    }
}

impl Drop for LiveUnpickler {
    fn drop(&mut self) {
        Self::forget();
    }
}

/// How many entries an unpickler's memo holds (`_pickle`'s memo proxy and `pickle._Unpickler`'s
/// dict both `copy()` to a dict).
fn memo_len(unpickler: &Bound<'_, PyAny>) -> Result<u64, String> {
    let memo = unpickler
        .getattr("memo")
        .and_then(|m| m.call_method0("copy"))
        .and_then(|m| m.len());
    memo.map(|n| n as u64)
        .map_err(|e| format!("the unpickler's memo could not be measured: {e}"))
}

/// Judges one load against the operator's policy, then the code's scope; logs; raises the
/// refusal, or returns the approval the load runs under.
fn decide(py: Python<'_>, scope: &ScopeObj, facts: &Facts<'_>) -> PyResult<Approval> {
    let gate = state::current();
    let policy = state::policy_of(&gate);
    let Facts {
        bytes,
        size,
        sha,
        callsite,
        source,
    } = *facts;
    let live = LIVE_UNPICKLER.with(|u| u.borrow_mut().take());
    let mut report: Option<Result<Report, ScanError>> = None;
    let judgement: Judgement = policy.judge_load(
        Load {
            sha256: &sha,
            callsite,
        },
        || {
            let memo_before = match &live {
                Some(unpickler) => memo_len(unpickler.bind(py))?,
                None => 0,
            };
            let scanned = report.get_or_insert_with(|| scan::scan_after(bytes, memo_before));
            scanned
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(Report::nameable_globals)
        },
    );
    let scope_verdict = scope.inner.permits(Some(&sha));
    let refused = judgement.action == Action::Refuse || scope_verdict.is_err();
    if !refused && judgement.action == Action::Run && !state::has_observer() {
        return Ok(policy.approval_while_running(&judgement)); // the common case: nothing to log
    }
    let found = found_in(bytes);
    let globals = found.globals.clone();
    let refusal_facts = RefusalFacts {
        callsite: callsite.to_string(),
        sha256: Some(sha.to_hex()),
        size: Some(size),
    };
    let event = |decision: &'static str, reason: Option<String>| Event {
        time: now(),
        pid: std::process::id(),
        mode: policy.mode.as_str(),
        decision,
        callsite: callsite.to_string(),
        sha256: Some(sha.to_hex()),
        size: Some(size),
        globals: globals.clone(),
        source: source.map(str::to_string),
        reason,
    };
    let manifest = policy.manifest.as_deref();

    if let (Action::Refuse, Err(refusal)) = (judgement.action, &judgement.verdict) {
        let reason = refusal.describe(manifest);
        let denial = event("deny", Some(reason.clone()));
        emit(&denial);
        observe_refusal(py, &denial);
        let message = format!(
            "picklegate refused to unpickle {size} bytes (sha256 {sha}) at {callsite}{}: {reason}.\n{}",
            source.map(|s| format!(" from {s}")).unwrap_or_default(),
            suggestion(refusal, manifest, &sha, callsite, found.complete.then_some(&globals[..]))
        );
        return Err(errors::pickle_denied(py, message, &refusal_facts));
    }
    if let Err(scope_refusal) = scope_verdict {
        let (reason, remedy) = match scope_refusal {
            ScopeRefusal::NoPickles => (
                "inside a no_pickles() block",
                format!("wrap the load in `with picklegate.allow_pickles(token):` or `allow_pickles(token, only_objects=[\"sha256:{sha}\"])`"),
            ),
            ScopeRefusal::NotInOnlyObjects => (
                "its sha256 is not in allow_pickles(only_objects=[...])",
                format!("add \"sha256:{sha}\" to only_objects after review"),
            ),
        };
        let denial = event("deny", Some(reason.to_string()));
        emit(&denial);
        observe_refusal(py, &denial);
        let message = format!(
            "picklegate refused to unpickle {size} bytes (sha256 {sha}) at {callsite}: {reason}. To permit it, {remedy}."
        );
        return Err(errors::no_pickle(py, message, &refusal_facts));
    }
    let decision = match (&judgement.verdict, policy.mode) {
        (_, Mode::Record) => event("record", None),
        (Err(refusal), _) if judgement.action == Action::RunAndReport => {
            event("warn", Some(refusal.describe(manifest)))
        }
        _ => event("allow", None),
    };
    if decision.decision != "allow" {
        emit(&decision);
    }
    if let Some(record_file) = gate
        .as_ref()
        .and_then(|g| g.record.as_ref())
        .filter(|_| policy.mode == Mode::Record)
    {
        record_file
            .append(&record_of(&decision, found))
            .map_err(|e| errors::policy_error(py, e.to_string()))?;
    }
    state::observe(py, &decision)?;
    Ok(policy.approval_while_running(&judgement))
}

/// Judges a container on its whole file, once.
fn settle(py: Python<'_>, container: &Container) -> PyResult<Approval> {
    if let Some(approval) = container.settled.get() {
        return Ok(approval);
    }
    let buffer = match &container.data {
        Content::Buffer(data) => Some(Bytes::borrow(data.bind(py))?),
        _ => None,
    };
    let hashed = match &container.data {
        Content::Hashed(file) => Some(file.bind(py).borrow()),
        _ => None,
    };
    let slice = match (&buffer, &hashed, &container.data) {
        (Some(bytes), _, _) => bytes.as_slice(),
        (_, Some(file), _) => file.bytes(),
        (_, _, Content::Pinned(pinned)) => pinned.private_bytes(),
        _ => unreachable!("a buffer or a hashed file is borrowed above"),
    };
    let facts = Facts {
        bytes: slice,
        size: slice.len() as u64,
        sha: container.sha,
        callsite: &container.callsite,
        source: container.source.as_deref(),
    };
    let approval = decide(py, &container.scope.borrow(py), &facts)?;
    container.settled.set(Some(approval));
    Ok(approval)
}

/// A load that needs no hash of its own: `Some(None)` when nothing is guarded, `Some(Some(_))`
/// inside a container (the file's verdict covers it), `None` when it must be judged.
fn decided_without_hash(py: Python<'_>, scope: &ScopeObj) -> PyResult<Option<Option<Approval>>> {
    if passthrough(scope) {
        return Ok(Some(None));
    }
    match innermost() {
        Some(Frame::Container(container)) => Ok(Some(Some(settle(py, &container)?))),
        _ => Ok(None),
    }
}

fn passthrough(scope: &ScopeObj) -> bool {
    let gate = state::current();
    state::policy_of(&gate).mode == Mode::Off && scope.inner.is_open()
}

/// Judges the load of the pickle `data` and, if it may run, calls `run`, which unpickles exactly
/// `data`. Inside a container, the container's verdict stands for it.
fn guard(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    scope: &ScopeObj,
    source: Option<&str>,
    run: impl FnOnce() -> PyResult<Py<PyAny>>,
    callsite: impl FnOnce() -> PyResult<String>,
) -> PyResult<Py<PyAny>> {
    if let Some(covered) = decided_without_hash(py, scope)? {
        let _running = covered.map(|approval| Running::enter(Frame::Load(approval)));
        LiveUnpickler::forget(); // no scan: a load nested in this one must not take it
        return run();
    }
    let bytes = Bytes::borrow(data)?;
    let slice = bytes.as_slice();
    if slice.is_empty() {
        // Nothing to decide: the unpickler raises its own EOFError, as callers expect.
        LiveUnpickler::forget();
        return run();
    }
    let callsite = callsite()?;
    let facts = Facts {
        bytes: slice,
        size: slice.len() as u64,
        sha: hash(py, data, slice),
        callsite: &callsite,
        source,
    };
    let _running = Running::enter(Frame::Load(decide(py, scope, &facts)?));
    run()
}

/// The Python-level entry: `run()` unpickles `data` (read from a file or stream by the caller).
#[pyfunction]
#[pyo3(signature = (data, scope, source, run, callsite, unpickler=None))]
pub fn guarded_load(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    scope: PyRef<'_, ScopeObj>,
    source: Option<String>,
    run: &Bound<'_, PyAny>,
    callsite: &Bound<'_, PyAny>,
    unpickler: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let _live = unpickler.map(LiveUnpickler::enter);
    guard(
        py,
        data,
        &scope,
        source.as_deref(),
        || run.call0().map(Bound::unbind),
        || callsite.call0()?.extract(),
    )
}

/// A load from a plain file read by `HashedFile`: judged on the hash taken while reading, then
/// `run()` unpickles from that same `file` object.
#[pyfunction]
#[pyo3(signature = (file, scope, source, run, callsite))]
pub fn guarded_file_load(
    py: Python<'_>,
    file: &Bound<'_, HashedFile>,
    scope: PyRef<'_, ScopeObj>,
    source: Option<String>,
    run: &Bound<'_, PyAny>,
    callsite: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    guard_file(
        py,
        file,
        &scope,
        source.as_deref(),
        || run.call0().map(Bound::unbind),
        || callsite.call0()?.extract(),
    )
}

fn guard_file(
    py: Python<'_>,
    file: &Bound<'_, HashedFile>,
    scope: &ScopeObj,
    source: Option<&str>,
    run: impl FnOnce() -> PyResult<Py<PyAny>>,
    callsite: impl FnOnce() -> PyResult<String>,
) -> PyResult<Py<PyAny>> {
    if let Some(covered) = decided_without_hash(py, scope)? {
        let _running = covered.map(|approval| Running::enter(Frame::Load(approval)));
        LiveUnpickler::forget(); // no scan: a load nested in this one must not take it
        return run();
    }
    let approval = {
        let hashed = file.borrow();
        if hashed.is_empty() {
            drop(hashed);
            LiveUnpickler::forget();
            return run(); // the unpickler raises its own EOFError
        }
        let callsite = callsite()?;
        let facts = Facts {
            bytes: hashed.bytes(),
            size: hashed.bytes().len() as u64,
            sha: hashed.sha,
            callsite: &callsite,
            source,
        };
        decide(py, scope, &facts)?
    }; // the borrow ends here: the unpickler reads `file`
    let _running = Running::enter(Frame::Load(approval));
    run()
}

/// The C-level entry: `_pickle.loads` redirected here, `call_original(None)` runs the real
/// function on the caller's arguments. A buffer that is not `bytes` (a bytearray, an mmap, a view
/// of memory another thread or process can write) is copied first, and the copy is what is hashed
/// and unpickled (`call_original(Some(copy))`): the bytes that run are the bytes that were hashed.
pub fn guarded_c_loads(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    call_original: impl FnOnce(Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    let scope = current_scope(py)?;
    let callsite = || Ok(callsite::current(py)?.to_string());
    if data.is_instance_of::<pyo3::types::PyBytes>() || passthrough(scope.get()) {
        return guard(
            py,
            data,
            scope.get(),
            None,
            || call_original(None),
            callsite,
        );
    }
    let Ok(copy) = Bytes::borrow(data).map(|bytes| pyo3::types::PyBytes::new(py, bytes.as_slice()))
    else {
        return guard(
            py,
            data,
            scope.get(),
            None,
            || call_original(None),
            callsite,
        ); // raises as before
    };
    let copy = copy.into_any();
    guard(
        py,
        &copy,
        scope.get(),
        None,
        || call_original(Some(&copy)),
        callsite,
    )
}

/// The Python helper that reads what a live unpickler's next load consumes:
/// `take(read, readline) -> (data, source, stream, done)` (see `_interpose._take_for_unpickler`).
static UNPICKLER_TAKE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// `spelled(data)`: the set of strings the pickle `data` spells out (its text arguments).
static SPELLED_STRINGS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[pyfunction]
pub fn set_unpickler_take(py: Python<'_>, take: Py<PyAny>, spelled: Py<PyAny>) {
    UNPICKLER_TAKE.get_or_init(py, || take);
    SPELLED_STRINGS.get_or_init(py, || spelled);
}

/// Code that, after an approved load, resolves names the loaded data lists by calling the
/// unpickler's `find_class` itself (`dill.session.load_module` restores a module's imports so).
const RESOLVES_AFTER_LOAD: &[&str] = &["dill.session"];

/// A load by one of those: the frame that ran it (and its code), and the strings its judged bytes
/// spell out. While that frame runs, its direct `find_class` calls may resolve those names only.
struct AfterLoad {
    frame: usize,
    code: usize,
    strings: std::collections::HashSet<String>,
}

thread_local! {
    static AFTER_LOAD: RefCell<Option<AfterLoad>> = const { RefCell::new(None) };
}

/// How many frames up from the load that code may be (dill's own `Unpickler.load` is between).
const AFTER_LOAD_DEPTH: usize = 4;

/// The frame (and its code) that runs this load, if it belongs to code that resolves names after it.
fn frame_resolving_after_load(py: Python<'_>) -> PyResult<Option<(usize, usize)>> {
    let mut frame = py.import("sys")?.call_method1("_getframe", (0,))?;
    for _ in 0..AFTER_LOAD_DEPTH {
        if frame.is_none() {
            break;
        }
        let module = frame.getattr("f_globals")?.get_item("__name__").ok();
        if module
            .and_then(|m| m.extract::<String>().ok())
            .is_some_and(|m| RESOLVES_AFTER_LOAD.contains(&m.as_str()))
        {
            return Ok(Some((
                frame.as_ptr() as usize,
                frame.getattr("f_code")?.as_ptr() as usize,
            )));
        }
        frame = frame.getattr("f_back")?;
    }
    Ok(None)
}

/// The backstop's question for a global resolved outside any load: is it `find_class` called
/// directly by the frame that just ran an approved load, for a name the approved bytes spell out?
pub fn resolved_after_approved_load(py: Python<'_>, module: &str, name: &str) -> PyResult<bool> {
    let Some((frame, code)) = AFTER_LOAD.with(|a| {
        a.borrow()
            .as_ref()
            .filter(|a| a.strings.contains(module) && a.strings.contains(name))
            .map(|a| (a.frame, a.code))
    }) else {
        return Ok(false);
    };
    let mut current = py.import("sys")?.call_method1("_getframe", (0,))?;
    while !current.is_none() {
        if current.as_ptr() as usize == frame
            && current.getattr("f_code")?.as_ptr() as usize == code
        {
            return Ok(true);
        }
        current = current.getattr("f_back")?;
    }
    Ok(false)
}

/// `_pickle.Unpickler.load` of any live unpickler, whatever its class: its next pickle is read
/// from its file, judged, and then the unpickler itself (its memo, `find_class`,
/// `persistent_load`) runs exactly those bytes, served through its input fields.
pub fn guarded_c_unpickler(
    py: Python<'_>,
    unpickler: &Bound<'_, PyAny>,
    run: impl FnOnce() -> PyResult<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    let scope = current_scope(py)?;
    if let Some(covered) = decided_without_hash(py, scope.get())? {
        let _running = covered.map(|approval| Running::enter(Frame::Load(approval)));
        return run();
    }
    // Redirected only once the layout is known and the helper set (see redirect_unpickler_load).
    let take = UNPICKLER_TAKE.get(py).filter(|_| unpickler::layout_known());
    let take = take.ok_or_else(|| {
        pyo3::exceptions::PyRuntimeError::new_err(
            "picklegate: the unpickler's input fields are not known; the load was refused",
        )
    })?;
    let Some((read, readline)) = unpickler::reader(unpickler) else {
        return run(); // __init__ was never called: the original raises its own error
    };
    let (data, source, stream, done): (
        Bound<'_, PyAny>,
        Option<String>,
        Bound<'_, PyAny>,
        Bound<'_, PyAny>,
    ) = take.bind(py).call1((read, readline))?.extract()?;
    let run = || {
        let _swapped = unpickler::swap(unpickler, &stream)?;
        run()
    };
    let callsite = || Ok(callsite::current(py)?.to_string());
    let _live = LiveUnpickler::enter(unpickler);
    let (result, after_load) = match data.cast::<HashedFile>() {
        Ok(file) => {
            let after_load = after_load(py, file.borrow().bytes())?;
            (
                guard_file(py, file, scope.get(), source.as_deref(), run, callsite),
                after_load,
            )
        }
        Err(_) => {
            let after_load = after_load(py, Bytes::borrow(&data)?.as_slice())?;
            (
                guard(py, &data, scope.get(), source.as_deref(), run, callsite),
                after_load,
            )
        }
    };
    if result.is_ok() && after_load.is_some() {
        AFTER_LOAD.with(|a| *a.borrow_mut() = after_load);
    }
    // Also after a refusal: the file is left where it was, the memory read for it let go.
    let finished = done.call1((result.is_err(),));
    let value = result?;
    finished?;
    Ok(value)
}

/// What a load by code that resolves names after it may resolve then (see `AfterLoad`).
fn after_load(py: Python<'_>, bytes: &[u8]) -> PyResult<Option<AfterLoad>> {
    let (Some((frame, code)), Some(spelled)) =
        (frame_resolving_after_load(py)?, SPELLED_STRINGS.get(py))
    else {
        return Ok(None);
    };
    let strings = spelled
        .bind(py)
        .call1((pyo3::types::PyBytes::new(py, bytes),))?
        .extract()?;
    Ok(Some(AfterLoad {
        frame,
        code,
        strings,
    }))
}

/// Reads a Python file object in chunks, for hashing without holding its content.
struct PyFileReader<'py>(Bound<'py, PyAny>);

impl std::io::Read for PyFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let chunk = self
            .0
            .call_method1("read", (buf.len(),))
            .map_err(std::io::Error::other)?;
        let bytes = Bytes::borrow(&chunk).map_err(std::io::Error::other)?;
        let n = bytes.as_slice().len().min(buf.len());
        buf[..n].copy_from_slice(&bytes.as_slice()[..n]);
        Ok(n)
    }
}

/// Called before a seekable file is read whole: when the policy or a `no_pickles()` block refuses
/// every load here whatever its bytes, hash the rest of the file in chunks (for the message, so a
/// huge file costs no memory), leave the position where it was, and raise that refusal.
#[pyfunction]
#[pyo3(signature = (file, scope, source))]
pub fn refuse_unread(
    py: Python<'_>,
    file: &Bound<'_, PyAny>,
    scope: PyRef<'_, ScopeObj>,
    source: Option<String>,
) -> PyResult<()> {
    if passthrough(&scope) || matches!(innermost(), Some(Frame::Container(_))) {
        return Ok(());
    }
    let callsite = callsite::current(py)?;
    let gate = state::current();
    let closed = scope.inner.permits(None) == Err(ScopeRefusal::NoPickles);
    if !closed && !state::policy_of(&gate).refuses_any_bytes_at(&callsite) {
        return Ok(());
    }
    let start = file.call_method0("tell")?;
    let mut counted = CountingReader {
        inner: PyFileReader(file.clone()),
        count: 0,
    };
    let sha = Digest::of_reader(&mut counted).map_err(|e| match e.into_inner() {
        Some(inner) => match inner.downcast::<PyErr>() {
            Ok(err) => *err,
            Err(other) => pyo3::exceptions::PyOSError::new_err(other.to_string()),
        },
        None => pyo3::exceptions::PyOSError::new_err("cannot read the file"),
    })?;
    file.call_method1("seek", (start,))?;
    if counted.count == 0 {
        return Ok(()); // an empty file: the unpickler raises its own EOFError
    }
    let facts = Facts {
        bytes: &[],
        size: counted.count,
        sha,
        callsite: &callsite,
        source: source.as_deref(),
    };
    decide(py, &scope, &facts).map(drop)
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Runs a loader library's call on a whole file, `data`, already read into memory (bytes, or a
/// `PinnedFile` that read and hashed it): `run()` must read only `data`. The file is judged by its own hash, at once when `eager`, else at its first
/// pickle load (a numeric `.npy` never unpickles, so it is never judged).
#[pyfunction]
#[pyo3(signature = (data, scope, source, run, callsite, eager))]
pub fn guarded_container(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    scope: Bound<'_, ScopeObj>,
    source: Option<String>,
    run: &Bound<'_, PyAny>,
    callsite: &Bound<'_, PyAny>,
    eager: bool,
) -> PyResult<Py<PyAny>> {
    if passthrough(scope.get()) || matches!(innermost(), Some(Frame::Container(_))) {
        return run.call0().map(Bound::unbind);
    }
    let (content, sha) = match data.cast::<crate::file::PinnedFile>() {
        Ok(pinned) => {
            let pinned = pinned.borrow().pinned.clone();
            let sha = pinned.sha;
            (Content::Pinned(pinned), sha)
        }
        Err(_) if data.is_instance_of::<HashedFile>() => {
            let file = data.cast::<HashedFile>()?;
            let sha = file.borrow().sha;
            (Content::Hashed(file.clone().unbind()), sha)
        }
        Err(_) => {
            let bytes = Bytes::borrow(data)?;
            (
                Content::Buffer(data.clone().unbind()),
                hash(py, data, bytes.as_slice()),
            )
        }
    };
    let container = Rc::new(Container {
        data: content,
        sha,
        callsite: callsite.call0()?.extract()?,
        source,
        scope: scope.unbind(),
        settled: Cell::new(None),
    });
    if eager {
        settle(py, &container)?;
    }
    let _running = Running::enter(Frame::Container(container));
    run.call0().map(Bound::unbind)
}
