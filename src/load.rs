//! The one decision point every interposed load goes through: hash the bytes, judge them
//! against the policy and the scope, log, then run the real unpickler on those same bytes.

use crate::buffer::Bytes;
use crate::errors::{self, RefusalFacts};
use crate::state::{self, emit};
use crate::tokens::ScopeObj;
use picklegate_core::event::Event;
use picklegate_core::hash::Digest;
use picklegate_core::manifest::Manifest;
use picklegate_core::record::Record;
use picklegate_core::policy::{Action, Approval, Judgement, Load, Mode, Refusal, ScopeRefusal};
use picklegate_core::scan::{self, Report, ScanError};
use pyo3::prelude::*;
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Hashing this much or more releases the GIL (only for immutable buffers).
const DETACH_THRESHOLD: usize = 1 << 20;

thread_local! {
    /// The approvals of the loads now running on this thread, innermost last.
    static ACTIVE: RefCell<Vec<Approval>> = const { RefCell::new(Vec::new()) };
}

/// The approval of the innermost load picklegate decided on this thread, if one is running.
pub fn active_approval() -> Option<Approval> {
    ACTIVE.with(|a| a.borrow().last().copied())
}

struct Running;

impl Running {
    fn enter(approval: Approval) -> Self {
        ACTIVE.with(|a| a.borrow_mut().push(approval));
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().pop());
    }
}

pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn global_names(report: &Option<Result<Report, ScanError>>) -> Vec<String> {
    match report {
        Some(Ok(r)) => r.globals.iter().map(|(m, n)| format!("{m}.{n}")).collect(),
        _ => Vec::new(),
    }
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings always serialize")
}

/// What a refusal message tells the user to add.
fn suggestion(refusal: &Refusal, manifest: Option<&Manifest>, sha: &Digest, callsite: &str, globals: &[String]) -> String {
    let target = manifest.map_or("a manifest (PICKLEGATE_POLICY)".to_string(), |m| m.source.clone());
    match refusal {
        Refusal::UntrustedGlobal { global, .. } => format!(
            "If {global} is safe for this transport, add it to that rule's globals in {target}."
        ),
        Refusal::Unscannable { .. } => "A trusted transport's pickle must be scannable; list it by sha256 instead.".into(),
        _ => {
            let globals = globals.iter().map(|g| toml_string(g)).collect::<Vec<_>>().join(", ");
            format!(
                "To allow it after review, add to {target}:\n\n[[allow]]\nsha256 = \"{sha}\"\ncallsite = {}\nnote = \"reviewed by ...\"\nglobals = [{globals}]\n",
                toml_string(callsite)
            )
        }
    }
}

/// The record-file line of a load that `record` mode lets run.
fn record_of(event: &Event) -> Record {
    Record {
        time: event.time,
        pid: event.pid,
        callsite: event.callsite.clone(),
        sha256: event.sha256.clone().unwrap_or_default(),
        size: event.size.unwrap_or_default(),
        globals: event.globals.clone(),
        source: event.source.clone(),
    }
}

/// A refusal is raised whatever the observer does; an observer that fails is reported.
fn observe_refusal(py: Python<'_>, event: &Event) {
    if let Err(error) = state::observe(py, event) {
        error.write_unraisable(py, None);
    }
}

/// Judges the load of `data` and, if it may run, calls `run()` (which unpickles `data`).
#[pyfunction]
#[pyo3(signature = (data, scope, source, run, callsite))]
pub fn guarded_load(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    scope: PyRef<'_, ScopeObj>,
    source: Option<String>,
    run: &Bound<'_, PyAny>,
    callsite: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let gate = state::current();
    let policy = state::policy_of(&gate);
    if policy.mode == Mode::Off && scope.inner.is_open() {
        return run.call0().map(Bound::unbind);
    }
    let bytes = Bytes::borrow(data)?;
    let slice = bytes.as_slice();
    if slice.is_empty() {
        // Nothing to decide: the unpickler raises its own EOFError, as callers expect.
        return run.call0().map(Bound::unbind);
    }
    let sha = if slice.len() >= DETACH_THRESHOLD && data.is_instance_of::<pyo3::types::PyBytes>() {
        py.detach(|| Digest::of(slice))
    } else {
        Digest::of(slice)
    };
    let callsite: String = callsite.call0()?.extract()?;
    let mut report: Option<Result<Report, ScanError>> = None;
    let judgement: Judgement = policy.judge_load(Load { sha256: &sha, callsite: &callsite }, || {
        let scanned = report.get_or_insert_with(|| scan::scan(slice));
        scanned.as_ref().map(|r| r.globals.clone()).map_err(|e| e.to_string())
    });
    let scope_verdict = scope.inner.permits(Some(&sha));
    let refused = judgement.action == Action::Refuse || scope_verdict.is_err();
    if refused || judgement.action == Action::RunAndReport {
        report.get_or_insert_with(|| scan::scan(slice));
    }
    let globals = global_names(&report);
    let facts = RefusalFacts { callsite: callsite.clone(), sha256: Some(sha.to_hex()), size: Some(slice.len() as u64) };
    let event = |decision: &'static str, reason: Option<String>| Event {
        time: now(),
        pid: std::process::id(),
        mode: policy.mode.as_str(),
        decision,
        callsite: callsite.clone(),
        sha256: Some(sha.to_hex()),
        size: Some(slice.len() as u64),
        globals: globals.clone(),
        source: source.clone(),
        reason,
    };
    let manifest = policy.manifest.as_deref();

    if let (Action::Refuse, Err(refusal)) = (judgement.action, &judgement.verdict) {
        let reason = refusal.describe(manifest);
        let denial = event("deny", Some(reason.clone()));
        emit(&denial);
        observe_refusal(py, &denial);
        let message = format!(
            "picklegate refused to unpickle {} bytes (sha256 {sha}) at {callsite}{}: {reason}.\n{}",
            slice.len(),
            source.as_ref().map(|s| format!(" from {s}")).unwrap_or_default(),
            suggestion(refusal, manifest, &sha, &callsite, &globals)
        );
        return Err(errors::pickle_denied(py, message, &facts));
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
            "picklegate refused to unpickle {} bytes (sha256 {sha}) at {callsite}: {reason}. To permit it, {remedy}.",
            slice.len()
        );
        return Err(errors::no_pickle(py, message, &facts));
    }
    let decision = match (&judgement.verdict, policy.mode) {
        (_, Mode::Record) => event("record", None),
        (Err(refusal), _) if judgement.action == Action::RunAndReport => event("warn", Some(refusal.describe(manifest))),
        _ => event("allow", None),
    };
    if decision.decision != "allow" {
        emit(&decision);
    }
    if let Some(record_file) = gate.as_ref().and_then(|g| g.record.as_ref()).filter(|_| policy.mode == Mode::Record) {
        record_file.append(&record_of(&decision)).map_err(|e| errors::policy_error(py, e.to_string()))?;
    }
    state::observe(py, &decision)?;
    let _running = Running::enter(policy.approval_while_running(&judgement));
    run.call0().map(Bound::unbind)
}
