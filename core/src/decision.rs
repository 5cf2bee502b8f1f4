//! The one decision on a pickle load or a global an unpickler resolves: from the facts (policy,
//! scope, hash, bytes, callsite) to all the binding carries out: run or refuse, event, record, error.

use crate::container::scan_all;
use crate::event::Event;
use crate::hash::Digest;
use crate::manifest::Manifest;
use crate::policy::{Action, Approval, Load, Mode, Policy, Refusal, Scope, ScopeRefusal};
use crate::record::Record;
use crate::risk::classify;
use crate::scan::{scan_after, Report};
use serde::Serialize;
use std::cell::{Cell, OnceCell};
use std::time::{SystemTime, UNIX_EPOCH};

/// The refusals that are not a judgement of bytes or of a global, but of picklegate's own state:
/// each fails closed. A live unpickler whose input fields are unknown cannot be served the bytes
/// that were judged, so its load is refused.
pub const UNKNOWN_UNPICKLER_LAYOUT: &str =
    "picklegate: the unpickler's input fields are not known; the load was refused";
/// The backstop failed (a panic) while judging a global: the global is refused.
pub const BACKSTOP_FAILED: &str = "picklegate's backstop failed; refusing the global";
/// Another audit hook vetoed the backstop's registration: picklegate refuses to run unguarded.
pub const BACKSTOP_NOT_REGISTERED: &str = "picklegate could not register its audit hook (another audit hook vetoed sys.addaudithook); refusing to run unguarded";

/// What the binding does with the load or the global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Run,
    Refuse,
    /// `warn`: the policy refuses it; it runs, and the refusal is logged.
    WarnAndRun,
    /// `record`: it runs, and is logged and written to the record file.
    RecordAndRun,
}

/// The exception a refusal raises (classes of `picklegate._errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operator's policy refuses it: `PickleDeniedError`.
    PickleDenied,
    /// The code's `no_pickles()` scope refuses it: `NoPickleError`.
    NoPickle,
}

/// Why a load or a global is refused: the operator's policy, or the code's own scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Policy(Refusal),
    Scope(ScopeRefusal),
}

/// A refusal as raised: the exception, its message, and the facts it carries as attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub kind: ErrorKind,
    pub message: String,
    pub callsite: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// Everything decided about one load or global.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Result<Approval, Refused>,
    pub outcome: Outcome,
    /// The approval a load that runs carries into the backstop (in `warn` and `record` a load the
    /// policy refuses still runs, and its globals are then only reported).
    pub approval: Approval,
    /// One sentence on what was refused (also when `warn` runs it anyway).
    pub reason: Option<String>,
    /// What the refusal message tells the user to add (an `[[allow]]` entry, or how to widen a rule).
    pub suggestion: Option<String>,
    /// The event to log; `None` for a quiet allowed load (nothing watches).
    pub event: Option<Box<Event>>,
    /// The observer sees the event (load decisions; a global's event is only logged).
    pub observed: bool,
    /// The record-file line, in `record` mode.
    pub record: Option<Box<Record>>,
    /// The error to raise, when refused.
    pub denial: Option<Box<Denial>>,
}

impl Decision {
    /// A load or global that runs with nothing to log.
    fn quiet(approval: Approval) -> Self {
        Decision {
            verdict: Ok(approval),
            outcome: Outcome::Run,
            approval,
            reason: None,
            suggestion: None,
            event: None,
            observed: false,
            record: None,
            denial: None,
        }
    }

    /// True when the event goes to the log (an allowed load's event only reaches the observer).
    pub fn logged(&self) -> bool {
        self.event.as_ref().is_some_and(|e| e.decision != "allow")
    }
}

/// The facts of one pickle load.
#[derive(Debug, Clone, Copy)]
pub struct LoadFacts<'a> {
    pub policy: &'a Policy,
    pub scope: &'a Scope,
    pub sha256: Digest,
    pub size: u64,
    /// The bytes, for the scan; empty when the load is refused before its file is read.
    pub bytes: &'a [u8],
    pub callsite: &'a str,
    /// The file the bytes come from, when known.
    pub source: Option<&'a str>,
    /// Someone watches every decision (the pytest plugin): allowed loads then get an event too.
    pub watched: bool,
}

/// The facts of one global resolved by an unpickler (the audit-time backstop).
#[derive(Debug, Clone, Copy)]
pub struct GlobalFacts<'a> {
    pub policy: &'a Policy,
    pub scope: &'a Scope,
    /// The load picklegate decided that runs now on this thread, if any.
    pub active: Option<Approval>,
    pub module: &'a str,
    pub name: &'a str,
}

/// What the scan of a load's bytes found, whatever carries the pickles (a torch zip, a joblib
/// file, an .npz): every global with its class, and whether the scan read it all.
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

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `text` as a TOML basic string, quoted and escaped.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

#[derive(Serialize)]
struct AllowEntry<'a> {
    sha256: &'a str,
    callsite: &'a str,
    note: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    globals: Option<&'a [String]>,
}

#[derive(Serialize)]
struct AllowTable<'a> {
    allow: [AllowEntry<'a>; 1],
}

/// The `[[allow]]` entry that would list a load, as the text to add to `target` (a manifest's path
/// or how to name one). `globals` is `None` when the scan did not read the whole pickle: the entry
/// then has no `globals` key (which admits any), never `globals = []` (which admits none).
pub fn allow_suggestion(
    target: &str,
    sha256: &str,
    callsite: &str,
    globals: Option<&[String]>,
) -> String {
    let entry = AllowTable {
        allow: [AllowEntry {
            sha256,
            callsite,
            note: "reviewed by ...",
            globals,
        }],
    };
    let toml = toml::to_string(&entry).expect("an [[allow]] entry always serializes");
    format!("To allow it after review, add to {target}:\n\n{toml}")
}

/// A load the pytest plugin's `enforce` refuses: neither the policy nor the test's
/// `@pytest.mark.picklegate(allow=[...])` lists it. Its facts are the load event's.
pub struct RefusedInTest<'a> {
    pub size: u64,
    pub sha256: &'a str,
    pub callsite: &'a str,
    pub reason: &'a str,
    pub globals: Option<&'a [String]>,
}

impl RefusedInTest<'_> {
    /// What the test sees; `policy` is the manifest's path when the run was given one.
    pub fn message(&self, policy: Option<&str>) -> String {
        let RefusedInTest {
            size,
            sha256,
            callsite,
            reason,
            globals,
        } = self;
        let target = policy.unwrap_or("a manifest (--picklegate-policy)");
        let suggestion = allow_suggestion(target, sha256, callsite, *globals);
        format!(
            "picklegate refused to unpickle {size} bytes (sha256 {sha256}) at {callsite}: {reason}.\n\
             {suggestion}\nor in this test only: @pytest.mark.picklegate(allow=[\"sha256:{sha256}\"])"
        )
    }
}

/// The error a load gets when the binding failed while carrying it out (a panic): the load is
/// refused, never run unjudged.
pub const INTERNAL_ERROR: &str = "picklegate: internal error; the load was refused";

/// How a process runs when some of `_pickle`'s entry points could not be redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interposition {
    /// Every entry point is redirected, or the mode promises nothing that needs them.
    Full,
    /// `enforce` runs on the audit-hook backstop alone, as the operator chose: say it once, loudly.
    BackstopOnly { warning: String },
    /// `enforce` refuses to run weaker than it says (`PolicyError`).
    Refused { message: String },
}

/// Whether the process may run with the entry points in `missing` (each named with why) not
/// redirected, on CPython `version`. Only `enforce` needs them all; `backstop_only` (asked only
/// then) says whether the operator accepted the audit-hook backstop alone, or why its setting is
/// unusable.
pub fn interposition(
    mode: Mode,
    missing: &[String],
    version: &str,
    backstop_only: impl FnOnce() -> Result<bool, String>,
) -> Result<Interposition, String> {
    if mode != Mode::Enforce || missing.is_empty() {
        return Ok(Interposition::Full);
    }
    let what = missing.join("; ");
    if backstop_only()? {
        return Ok(Interposition::BackstopOnly {
            warning: format!(
                "picklegate: WARNING: enforce runs BACKSTOP-ONLY, as the operator chose (PICKLEGATE_BACKSTOP_ONLY / \
                 backstop_only=True): not redirected: {what}. Unpicklers made before install and references \
                 captured before it are judged only by the audit hook on the globals they resolve.\n"
            ),
        });
    }
    Ok(Interposition::Refused {
        message: format!(
            "enforce cannot give its full guarantee on this Python (CPython {version}): not redirected: {what}. \
             Refusing to run weaker. To run with the audit-hook backstop alone, set PICKLEGATE_BACKSTOP_ONLY=1 \
             (or install(..., backstop_only=True))"
        ),
    })
}

/// The value of `PICKLEGATE_BACKSTOP_ONLY` (`None`: unset) as a choice: `1` accepts backstop-only
/// enforcement, empty or `0` does not; anything else is a mistake, said.
pub fn backstop_only_setting(setting: Option<&str>) -> Result<bool, String> {
    match setting {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!(
            "PICKLEGATE_BACKSTOP_ONLY={other:?}: expected 1 (accept backstop-only enforcement) or 0"
        )),
    }
}

/// What a refusal by the policy tells the user to add.
fn suggestion(
    refusal: &Refusal,
    manifest: Option<&Manifest>,
    sha: &Digest,
    callsite: &str,
    globals: Option<&[String]>,
) -> String {
    let target = manifest.map_or("a manifest (PICKLEGATE_POLICY)", |m| m.source.as_str());
    match refusal {
        Refusal::UntrustedGlobal { global, .. } => format!(
            "If {global} is safe for this transport, add it to that rule's globals in {target}."
        ),
        Refusal::Unscannable { .. } => {
            "A trusted transport's pickle must be scannable; list it by sha256 instead.".into()
        }
        _ => allow_suggestion(target, &sha.to_hex(), callsite, globals),
    }
}

/// Why the scope refuses a load, and how to permit it.
fn scope_reason(refusal: &ScopeRefusal, sha: &Digest) -> (&'static str, String) {
    match refusal {
        ScopeRefusal::NoPickles => (
            "inside a no_pickles() block",
            format!("wrap the load in `with picklegate.allow_pickles(token):` or `allow_pickles(token, only_objects=[\"sha256:{sha}\"])`"),
        ),
        ScopeRefusal::NotInOnlyObjects => (
            "its sha256 is not in allow_pickles(only_objects=[...])",
            format!("add \"sha256:{sha}\" to only_objects after review"),
        ),
    }
}

/// Decides one pickle load: the operator's policy first, then the code's scope. `memo_before`
/// (the keys a reused unpickler's memo holds already) is asked only when a `[[trust]]`
/// rule needs the globals scanned.
pub fn decide_load(
    facts: &LoadFacts<'_>,
    memo_before: impl FnOnce() -> Result<Vec<u64>, String>,
) -> Decision {
    let LoadFacts {
        policy,
        scope,
        sha256: sha,
        size,
        bytes,
        callsite,
        source,
        watched,
    } = *facts;
    let judgement = policy.judge_load(
        Load {
            sha256: &sha,
            callsite,
        },
        || {
            scan_after(bytes, &memo_before()?)
                .map_err(|e| e.to_string())
                .and_then(|report: Report| report.nameable_globals())
        },
    );
    let approval = policy.approval_while_running(&judgement);
    let scope_verdict = scope.permits(Some(&sha));
    if scope_verdict.is_ok() && judgement.action == Action::Run && !watched {
        return Decision::quiet(approval); // the common case: nothing to log
    }
    let found = found_in(bytes);
    let manifest = policy.manifest.as_deref();
    let event = |decision: &'static str, reason: Option<String>| Event {
        time: now(),
        pid: std::process::id(),
        mode: policy.mode.as_str(),
        decision,
        callsite: callsite.to_string(),
        sha256: Some(sha.to_hex()),
        size: Some(size),
        globals: found.globals.clone(),
        source: source.map(str::to_string),
        reason,
    };
    let denial = |kind, message| Denial {
        kind,
        message,
        callsite: callsite.to_string(),
        sha256: Some(sha.to_hex()),
        size: Some(size),
    };
    let refuse = |verdict, reason: String, suggestion: Option<String>, denial: Denial| Decision {
        verdict: Err(verdict),
        outcome: Outcome::Refuse,
        approval,
        event: Some(Box::new(event("deny", Some(reason.clone())))),
        observed: true,
        reason: Some(reason),
        suggestion,
        record: None,
        denial: Some(Box::new(denial)),
    };

    if let (Action::Refuse, Err(refusal)) = (judgement.action, &judgement.verdict) {
        let reason = refusal.describe(manifest);
        let globals = found.complete.then_some(&found.globals[..]);
        let suggested = suggestion(refusal, manifest, &sha, callsite, globals);
        let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
        let message = format!(
            "picklegate refused to unpickle {size} bytes (sha256 {sha}) at {callsite}{from}: {reason}.\n{suggested}"
        );
        let denied = denial(ErrorKind::PickleDenied, message);
        return refuse(
            Refused::Policy(refusal.clone()),
            reason,
            Some(suggested),
            denied,
        );
    }
    if let Err(scope_refusal) = scope_verdict {
        let (reason, remedy) = scope_reason(&scope_refusal, &sha);
        let message = format!(
            "picklegate refused to unpickle {size} bytes (sha256 {sha}) at {callsite}: {reason}. To permit it, {remedy}."
        );
        let denied = denial(ErrorKind::NoPickle, message);
        return refuse(
            Refused::Scope(scope_refusal),
            reason.into(),
            Some(remedy),
            denied,
        );
    }
    let reason = judgement
        .verdict
        .as_ref()
        .err()
        .map(|refusal| refusal.describe(manifest));
    let (outcome, event) = match (policy.mode, judgement.action) {
        (Mode::Record, _) => (Outcome::RecordAndRun, event("record", None)),
        (_, Action::RunAndReport) if reason.is_some() => {
            (Outcome::WarnAndRun, event("warn", reason.clone()))
        }
        _ => (Outcome::Run, event("allow", None)),
    };
    let record = (outcome == Outcome::RecordAndRun).then(|| {
        Box::new(Record {
            time: event.time,
            pid: event.pid,
            callsite: event.callsite.clone(),
            sha256: sha.to_hex(),
            size,
            globals: found.globals.clone(),
            classes: found.classes.clone(),
            globals_complete: found.complete,
            source: event.source.clone(),
        })
    });
    Decision {
        verdict: judgement.verdict.map_err(Refused::Policy),
        outcome,
        approval,
        reason,
        suggestion: None,
        event: Some(Box::new(event)),
        observed: true,
        record,
        denial: None,
    }
}

/// Decides one global an unpickler resolves (`pickle.find_class`): the backstop. `callsite`
/// is asked only when needed; `defined_there` (what it resolves to is a class or function that
/// module defines) only for a global nothing but a `*` pattern admits; `resolved_after_load`
/// (the code that just ran an approved load resolves a name those bytes spell out) only
/// outside any load.
pub fn decide_global<E>(
    facts: &GlobalFacts<'_>,
    callsite: impl FnOnce() -> String,
    defined_there: impl FnOnce() -> bool,
    resolved_after_load: impl FnOnce() -> Result<bool, E>,
) -> Result<Decision, E> {
    let GlobalFacts {
        policy,
        scope,
        active,
        module,
        name,
    } = *facts;
    let callsite = Cell::new(Some(callsite));
    let site = OnceCell::new();
    let site = || {
        site.get_or_init(|| callsite.take().expect("asked once")())
            .clone()
    };
    let global = format!("{module}.{name}");
    let denial = |kind, message| Denial {
        kind,
        message,
        callsite: site(),
        sha256: None,
        size: None,
    };
    if active.is_none() && scope.permits(None).is_err() {
        let reason = "an unpickler that bypassed picklegate ran inside a no_pickles() block";
        let message = format!("picklegate refused global {global} at {}: {reason}", site());
        return Ok(Decision {
            verdict: Err(Refused::Scope(ScopeRefusal::NoPickles)),
            outcome: Outcome::Refuse,
            approval: Approval::Unchecked,
            reason: Some(reason.into()),
            suggestion: None,
            event: None,
            observed: false,
            record: None,
            denial: Some(Box::new(denial(ErrorKind::NoPickle, message))),
        });
    }
    if policy.mode == Mode::Off || (active.is_none() && resolved_after_load()?) {
        return Ok(Decision::quiet(Approval::Unchecked));
    }
    let judgement = policy.judge_global(active, module, name, site, defined_there);
    let refusal = match (&judgement.verdict, judgement.action) {
        (Err(refusal), Action::Refuse | Action::RunAndReport) => refusal,
        (Ok(approval), _) => return Ok(Decision::quiet(*approval)),
        (Err(_), Action::Run) => return Ok(Decision::quiet(Approval::Unchecked)),
    };
    let reason = refusal.describe(policy.manifest.as_deref());
    let refused = judgement.action == Action::Refuse;
    let event = Event {
        time: now(),
        pid: std::process::id(),
        mode: policy.mode.as_str(),
        decision: if refused { "deny" } else { "warn" },
        callsite: site(),
        sha256: None,
        size: None,
        globals: vec![global.clone()],
        source: None,
        reason: Some(reason.clone()),
    };
    let suggested = format!(
        "If this unpickler is a trusted transport, add a [[trust]] rule with callsite = {} and globals = [{}].",
        toml_string(&site()),
        toml_string(&global)
    );
    let message = format!(
        "picklegate refused global {global} at {}: {reason}. {suggested}",
        site()
    );
    Ok(Decision {
        verdict: Err(Refused::Policy(refusal.clone())),
        outcome: if refused {
            Outcome::Refuse
        } else {
            Outcome::WarnAndRun
        },
        approval: Approval::Unchecked,
        reason: Some(reason),
        suggestion: refused.then_some(suggested),
        event: Some(Box::new(event)),
        observed: false,
        record: None,
        denial: refused.then(|| Box::new(denial(ErrorKind::PickleDenied, message))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Origin, TokenFacts};
    use std::sync::Arc;

    const SITE: &str = "app.models:load";
    /// Protocol 2: `os.system` (one global), then STOP.
    const WITH_GLOBAL: &[u8] = b"\x80\x02cos\nsystem\n.";
    /// Protocol 2: the int 7; no global.
    const PLAIN: &[u8] = b"\x80\x02K\x07.";

    fn manifest(text: &str) -> Arc<Manifest> {
        Arc::new(Manifest::parse(&format!("version = 1\n{text}"), "m.toml").unwrap())
    }

    fn listing(bytes: &[u8], callsite: &str) -> Arc<Manifest> {
        manifest(&format!(
            "[[allow]]\nsha256 = \"{}\"\ncallsite = \"{callsite}\"\n[[trust]]\ncallsite = \"app.transport:*\"\nglobals = [\"app.Data\"]\n",
            Digest::of(bytes)
        ))
    }

    fn policy(mode: Mode, manifest: Option<Arc<Manifest>>) -> Policy {
        Policy { mode, manifest }
    }

    fn facts<'a>(
        policy: &'a Policy,
        scope: &'a Scope,
        bytes: &'a [u8],
        callsite: &'a str,
    ) -> LoadFacts<'a> {
        LoadFacts {
            policy,
            scope,
            sha256: Digest::of(bytes),
            size: bytes.len() as u64,
            bytes,
            callsite,
            source: None,
            watched: false,
        }
    }

    fn no_memo() -> Result<Vec<u64>, String> {
        Ok(Vec::new())
    }

    fn closed() -> Scope {
        Scope::default().no_pickles(1)
    }

    /// The `[[allow]]` table a suggestion proposes, parsed back as TOML.
    fn suggested_entry(decision: &Decision) -> toml::Table {
        let text = decision.suggestion.as_deref().expect("a suggestion");
        let toml = text.split_once(":\n\n").expect("a TOML part").1;
        let table: toml::Table = toml::from_str(toml).expect("the suggestion is valid TOML");
        table["allow"].as_array().unwrap()[0]
            .as_table()
            .unwrap()
            .clone()
    }

    #[test]
    fn off_and_listed_loads_run_quietly() {
        let open = Scope::default();
        for p in [
            policy(Mode::Off, None),
            policy(Mode::Enforce, Some(listing(WITH_GLOBAL, SITE))),
            policy(Mode::Warn, Some(listing(WITH_GLOBAL, SITE))),
        ] {
            let d = decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo);
            assert_eq!(d.outcome, Outcome::Run, "{:?}", p.mode);
            assert_eq!((d.event, d.denial, d.record), (None, None, None));
        }
        let p = policy(Mode::Enforce, Some(listing(WITH_GLOBAL, SITE)));
        assert_eq!(
            decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo).approval,
            Approval::Entry(0)
        );
    }

    #[test]
    fn a_watched_allowed_load_gets_an_allow_event_that_is_not_logged() {
        let p = policy(Mode::Enforce, Some(listing(WITH_GLOBAL, SITE)));
        let open = Scope::default();
        let d = decide_load(
            &LoadFacts {
                watched: true,
                source: Some("model.pkl"),
                ..facts(&p, &open, WITH_GLOBAL, SITE)
            },
            no_memo,
        );
        let event = d.event.as_ref().unwrap();
        assert_eq!((event.decision, event.mode), ("allow", "enforce"));
        assert_eq!(event.globals, ["os.system"]);
        assert_eq!(event.source.as_deref(), Some("model.pkl"));
        assert!(!d.logged());
    }

    #[test]
    fn enforce_refuses_each_policy_refusal_with_its_message() {
        let open = Scope::default();
        // no manifest: the global no-pickle mode
        let p = policy(Mode::Enforce, None);
        let d = decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(d.verdict, Err(Refused::Policy(Refusal::NoPolicy)));
        assert_eq!(d.outcome, Outcome::Refuse);
        let denial = d.denial.as_ref().unwrap();
        assert_eq!(denial.kind, ErrorKind::PickleDenied);
        assert!(denial.message.starts_with(&format!(
            "picklegate refused to unpickle {} bytes (sha256 {}) at {SITE}: no manifest is in force",
            WITH_GLOBAL.len(),
            Digest::of(WITH_GLOBAL)
        )));
        assert!(denial
            .message
            .contains("add to a manifest (PICKLEGATE_POLICY):\n\n[[allow]]\n"));
        assert_eq!(denial.sha256, Some(Digest::of(WITH_GLOBAL).to_hex()));
        assert_eq!(d.event.as_ref().unwrap().decision, "deny");
        assert!(d.logged());
        // not listed: the suggestion lists it, with the globals the scan found
        let p = policy(Mode::Enforce, Some(listing(PLAIN, SITE)));
        let d = decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(d.verdict, Err(Refused::Policy(Refusal::NotListed)));
        let entry = suggested_entry(&d);
        assert_eq!(
            entry["sha256"].as_str(),
            Some(Digest::of(WITH_GLOBAL).to_hex().as_str())
        );
        assert_eq!(entry["callsite"].as_str(), Some(SITE));
        assert_eq!(
            entry["globals"].as_array().unwrap()[0].as_str(),
            Some("os.system")
        );
        assert!(d
            .suggestion
            .unwrap()
            .starts_with("To allow it after review, add to m.toml:"));
        // listed for another callsite
        let p = policy(Mode::Enforce, Some(listing(WITH_GLOBAL, "app.other:load")));
        let d = decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(
            d.verdict,
            Err(Refused::Policy(Refusal::WrongCallsite {
                listed_for: vec!["app.other:load".into()]
            }))
        );
        assert!(d
            .reason
            .unwrap()
            .contains("only for callsite(s) app.other:load"));
    }

    #[test]
    fn a_trusted_transport_is_judged_on_its_scanned_globals() {
        let open = Scope::default();
        let p = policy(Mode::Enforce, Some(listing(PLAIN, SITE)));
        let at = "app.transport:recv";
        let data = b"\x80\x02capp\nData\n.";
        assert_eq!(
            decide_load(&facts(&p, &open, data, at), no_memo).verdict,
            Ok(Approval::Trust(0))
        );
        let d = decide_load(&facts(&p, &open, WITH_GLOBAL, at), no_memo);
        assert_eq!(
            d.verdict,
            Err(Refused::Policy(Refusal::UntrustedGlobal {
                rule: 0,
                global: "os.system".into()
            }))
        );
        assert_eq!(
            d.suggestion.as_deref(),
            Some(
                "If os.system is safe for this transport, add it to that rule's globals in m.toml."
            )
        );
        // a live unpickler whose memo cannot be measured: the pickle cannot be scanned
        let d = decide_load(&facts(&p, &open, data, at), || Err("no memo".into()));
        assert!(matches!(
            d.verdict,
            Err(Refused::Policy(Refusal::Unscannable { rule: 0, ref reason })) if reason == "no memo"
        ));
        assert!(d.suggestion.unwrap().contains("list it by sha256 instead"));
        // the memo is measured only when a trust rule needs the scan
        let unasked = || -> Result<Vec<u64>, String> { panic!("a listed load is not scanned") };
        assert_eq!(
            decide_load(&facts(&p, &open, PLAIN, SITE), unasked).outcome,
            Outcome::Run
        );
    }

    #[test]
    fn warn_runs_a_refused_load_and_reports_it() {
        let p = policy(Mode::Warn, None);
        let open = Scope::default();
        let d = decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(d.outcome, Outcome::WarnAndRun);
        assert_eq!(d.approval, Approval::Unchecked);
        assert_eq!(d.denial, None);
        let event = d.event.unwrap();
        assert_eq!((event.decision, event.mode), ("warn", "warn"));
        assert!(event.reason.unwrap().starts_with("no manifest is in force"));
    }

    #[test]
    fn record_runs_every_load_and_writes_its_line() {
        let p = policy(Mode::Record, None);
        let open = Scope::default();
        let d = decide_load(
            &LoadFacts {
                source: Some("a.pkl"),
                ..facts(&p, &open, WITH_GLOBAL, SITE)
            },
            no_memo,
        );
        assert_eq!(d.outcome, Outcome::RecordAndRun);
        assert_eq!(d.event.as_ref().unwrap().decision, "record");
        let record = d.record.unwrap();
        assert_eq!(record.sha256, Digest::of(WITH_GLOBAL).to_hex());
        assert_eq!(
            (record.callsite.as_str(), record.size),
            (SITE, WITH_GLOBAL.len() as u64)
        );
        assert_eq!(record.globals, ["os.system"]);
        assert_eq!(record.classes, ["code"]);
        assert!(record.globals_complete);
        assert_eq!(record.source.as_deref(), Some("a.pkl"));
        // a listed load is recorded too
        let p = policy(Mode::Record, Some(listing(WITH_GLOBAL, SITE)));
        assert!(decide_load(&facts(&p, &open, WITH_GLOBAL, SITE), no_memo)
            .record
            .is_some());
    }

    #[test]
    fn the_scope_refuses_after_the_policy_allows() {
        let p = policy(Mode::Enforce, Some(listing(WITH_GLOBAL, SITE)));
        let scope = closed();
        let d = decide_load(&facts(&p, &scope, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(d.verdict, Err(Refused::Scope(ScopeRefusal::NoPickles)));
        let denial = d.denial.unwrap();
        assert_eq!(denial.kind, ErrorKind::NoPickle);
        assert!(denial.message.contains(": inside a no_pickles() block. To permit it, wrap the load in `with picklegate.allow_pickles(token):`"));
        // with no policy at all (mode off), the scope alone refuses
        let off = policy(Mode::Off, None);
        assert_eq!(
            decide_load(&facts(&off, &scope, WITH_GLOBAL, SITE), no_memo).outcome,
            Outcome::Refuse
        );
        // allow_pickles(only_objects=[...]) that does not list these bytes
        let token = TokenFacts {
            id: 1,
            origin: Origin { thread: 1, task: 0 },
            open: true,
        };
        let only = scope
            .allow(token, token.origin, Some([Digest::of(PLAIN)].into()))
            .unwrap();
        let d = decide_load(&facts(&off, &only, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(
            d.verdict,
            Err(Refused::Scope(ScopeRefusal::NotInOnlyObjects))
        );
        assert!(d.denial.unwrap().message.ends_with(&format!(
            "To permit it, add \"sha256:{}\" to only_objects after review.",
            Digest::of(WITH_GLOBAL)
        )));
        assert_eq!(
            decide_load(&facts(&off, &only, PLAIN, SITE), no_memo).outcome,
            Outcome::Run
        );
        // the operator's refusal comes first, as PickleDeniedError
        let deny_all = policy(Mode::Enforce, None);
        let d = decide_load(&facts(&deny_all, &scope, WITH_GLOBAL, SITE), no_memo);
        assert_eq!(d.denial.unwrap().kind, ErrorKind::PickleDenied);
    }

    #[test]
    fn a_file_refused_unread_names_its_source_and_suggests_no_globals_key() {
        let p = policy(Mode::Enforce, None);
        let open = Scope::default();
        let d = decide_load(
            &LoadFacts {
                bytes: &[],
                size: 1 << 40,
                source: Some("/data/huge.pkl"),
                ..facts(&p, &open, WITH_GLOBAL, SITE)
            },
            no_memo,
        );
        let message = d.denial.as_ref().unwrap().message.clone();
        assert!(message.contains(&format!("refused to unpickle {} bytes", 1u64 << 40)));
        assert!(message.contains(&format!("at {SITE} from /data/huge.pkl: ")));
        assert!(!suggested_entry(&d).contains_key("globals"), "{message}");
    }

    #[test]
    fn the_suggestion_is_toml_for_any_callsite_text() {
        for callsite in ["a:\"quoted\"", "a:back\\slash", "a:tab\there", "a:ünï"] {
            let text = allow_suggestion("m.toml", "ab", callsite, Some(&["m.\"x\"".to_string()]));
            let table: toml::Table = toml::from_str(text.split_once(":\n\n").unwrap().1).unwrap();
            let entry = table["allow"].as_array().unwrap()[0].as_table().unwrap();
            assert_eq!(entry["callsite"].as_str(), Some(callsite));
            assert_eq!(entry["note"].as_str(), Some("reviewed by ..."));
            assert_eq!(
                entry["globals"].as_array().unwrap()[0].as_str(),
                Some("m.\"x\"")
            );
        }
        let empty = allow_suggestion("m.toml", "ab", "a:b", Some(&[]));
        assert!(empty.contains("globals = []"), "{empty}");
    }

    fn global<'a>(
        policy: &'a Policy,
        scope: &'a Scope,
        active: Option<Approval>,
        name: &'a str,
    ) -> GlobalFacts<'a> {
        GlobalFacts {
            policy,
            scope,
            active,
            module: "os",
            name,
        }
    }

    fn site() -> String {
        SITE.into()
    }

    fn never_after() -> Result<bool, ()> {
        Ok(false)
    }

    #[test]
    fn a_global_outside_any_load_is_refused_with_a_trust_suggestion() {
        let p = policy(Mode::Enforce, None);
        let open = Scope::default();
        let d = decide_global(
            &global(&p, &open, None, "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!(
            d.verdict,
            Err(Refused::Policy(Refusal::OutsideApprovedLoad {
                global: "os.system".into()
            }))
        );
        let denial = d.denial.unwrap();
        assert_eq!(
            (denial.kind, denial.sha256, denial.size),
            (ErrorKind::PickleDenied, None, None)
        );
        assert_eq!(
            denial.message,
            format!("picklegate refused global os.system at {SITE}: global os.system was resolved by an unpickler outside any approved load (backstop). If this unpickler is a trusted transport, add a [[trust]] rule with callsite = \"{SITE}\" and globals = [\"os.system\"].")
        );
        assert_eq!(d.event.unwrap().decision, "deny");
        // warn: reported, run
        let warn = policy(Mode::Warn, None);
        let d = decide_global(
            &global(&warn, &open, None, "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!((d.outcome, d.denial), (Outcome::WarnAndRun, None));
        assert_eq!(d.event.unwrap().decision, "warn");
        // record: a global outside a load is reported like warn; inside a load it runs
        let record = policy(Mode::Record, None);
        let d = decide_global(
            &global(&record, &open, None, "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!(d.outcome, Outcome::WarnAndRun);
        let d = decide_global(
            &global(&record, &open, Some(Approval::Unchecked), "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!((d.outcome, d.event), (Outcome::Run, None));
    }

    #[test]
    fn a_global_inside_an_approved_load_is_held_to_its_entry() {
        let text = format!(
            "[[allow]]\nsha256 = \"{}\"\ncallsite = \"{SITE}\"\nglobals = [\"os.*\"]\n",
            Digest::of(WITH_GLOBAL)
        );
        let p = policy(Mode::Enforce, Some(manifest(&text)));
        let open = Scope::default();
        let no_site = || -> String { panic!("no callsite needed inside a decided load") };
        let inside = Some(Approval::Entry(0));
        let d = decide_global(
            &global(&p, &open, inside, "system"),
            no_site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!(
            (d.outcome, d.verdict),
            (Outcome::Run, Ok(Approval::Entry(0)))
        );
        let d = decide_global(
            &global(&p, &open, inside, "path"),
            site,
            || false,
            never_after,
        )
        .unwrap();
        assert_eq!(
            d.verdict,
            Err(Refused::Policy(Refusal::NotDefinedThere {
                global: "os.path".into()
            }))
        );
        assert_eq!(d.outcome, Outcome::Refuse);
        let other = GlobalFacts {
            module: "sys",
            ..global(&p, &open, inside, "modules")
        };
        let d = decide_global(&other, site, || true, never_after).unwrap();
        assert!(matches!(
            d.verdict,
            Err(Refused::Policy(Refusal::GlobalNotInEntry { entry: 0, .. }))
        ));
    }

    #[test]
    fn a_global_in_a_no_pickles_block_off_or_after_a_load() {
        let p = policy(Mode::Off, None);
        // an unpickler that bypassed picklegate inside no_pickles(): refused even under off
        let scope = closed();
        let d = decide_global(
            &global(&p, &scope, None, "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        let denial = d.denial.unwrap();
        assert_eq!(denial.kind, ErrorKind::NoPickle);
        assert_eq!(
            denial.message,
            format!("picklegate refused global os.system at {SITE}: an unpickler that bypassed picklegate ran inside a no_pickles() block")
        );
        assert_eq!(d.event, None);
        // inside a decided load the load's own decision stands
        let d = decide_global(
            &global(&p, &scope, Some(Approval::Unchecked), "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!(d.outcome, Outcome::Run);
        // off, open scope: runs
        let open = Scope::default();
        let d = decide_global(
            &global(&p, &open, None, "system"),
            site,
            || true,
            never_after,
        )
        .unwrap();
        assert_eq!(d.outcome, Outcome::Run);
        // a name the code that just ran an approved load resolves: runs; its error propagates
        let deny_all = policy(Mode::Enforce, None);
        let after = || Ok::<_, ()>(true);
        let d = decide_global(
            &global(&deny_all, &open, None, "system"),
            site,
            || true,
            after,
        )
        .unwrap();
        assert_eq!(d.outcome, Outcome::Run);
        let failing = || Err::<bool, &str>("frame error");
        assert_eq!(
            decide_global(
                &global(&deny_all, &open, None, "system"),
                site,
                || true,
                failing
            ),
            Err("frame error")
        );
    }

    #[test]
    fn a_test_refusal_names_the_load_and_both_ways_to_allow_it() {
        let sha = "ab".repeat(32);
        let globals = ["collections.OrderedDict".to_string()];
        let refused = RefusedInTest {
            size: 12,
            sha256: &sha,
            callsite: "tests.test_x:load",
            reason: "no [[allow]] entry lists its sha256",
            globals: Some(&globals),
        };
        let message = refused.message(Some("policy.toml"));
        assert!(message.starts_with(&format!(
            "picklegate refused to unpickle 12 bytes (sha256 {sha}) at tests.test_x:load: no [[allow]] entry lists its sha256.\nTo allow it after review, add to policy.toml:\n"
        )), "{message}");
        assert!(
            message.contains("globals = [\"collections.OrderedDict\"]"),
            "{message}"
        );
        assert!(
            message.ends_with(&format!(
                "\nor in this test only: @pytest.mark.picklegate(allow=[\"sha256:{sha}\"])"
            )),
            "{message}"
        );
        let unscanned = RefusedInTest {
            globals: None,
            ..refused
        };
        let without_policy = unscanned.message(None);
        assert!(
            without_policy.contains("add to a manifest (--picklegate-policy):"),
            "{without_policy}"
        );
        assert!(!without_policy.contains("globals"), "{without_policy}");
    }

    #[test]
    fn backstop_only_is_opted_into_by_1_alone() {
        for unset in [None, Some(""), Some("0")] {
            assert_eq!(backstop_only_setting(unset), Ok(false), "{unset:?}");
        }
        assert_eq!(backstop_only_setting(Some("1")), Ok(true));
        for wrong in ["yes", "true", " 1", "2"] {
            let error = backstop_only_setting(Some(wrong)).unwrap_err();
            assert!(
                error.starts_with(&format!("PICKLEGATE_BACKSTOP_ONLY={wrong:?}: expected 1")),
                "{error}"
            );
        }
    }

    #[test]
    fn only_enforce_needs_every_entry_point_redirected() {
        let missing = ["_pickle.load (no slot)".to_string()];
        let never_asked = || -> Result<bool, String> { panic!("asked outside enforce") };
        for mode in [Mode::Off, Mode::Record, Mode::Warn] {
            assert_eq!(
                interposition(mode, &missing, "3.11.4", never_asked),
                Ok(Interposition::Full)
            );
        }
        assert_eq!(
            interposition(Mode::Enforce, &[], "3.11.4", never_asked),
            Ok(Interposition::Full)
        );
        let Ok(Interposition::Refused { message }) =
            interposition(Mode::Enforce, &missing, "3.11.4", || Ok(false))
        else {
            panic!("enforce ran weaker than it says");
        };
        assert!(message.starts_with("enforce cannot give its full guarantee on this Python (CPython 3.11.4): not redirected: _pickle.load (no slot). Refusing to run weaker."), "{message}");
        let Ok(Interposition::BackstopOnly { warning }) =
            interposition(Mode::Enforce, &missing, "3.11.4", || Ok(true))
        else {
            panic!("the operator's choice was not taken");
        };
        assert!(
            warning.starts_with("picklegate: WARNING: enforce runs BACKSTOP-ONLY"),
            "{warning}"
        );
        assert!(
            warning.contains("not redirected: _pickle.load (no slot)."),
            "{warning}"
        );
        assert_eq!(
            interposition(Mode::Enforce, &missing, "3.11.4", || Err("bad".into())),
            Err("bad".to_string())
        );
    }
}
