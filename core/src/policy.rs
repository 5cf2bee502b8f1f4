//! Load decisions as pure functions: the operator's manifest and mode, then the code's
//! `no_pickles`/`allow_pickles` scope, then the backstop's ruling on each resolved global.

use crate::callsite::{callsite_matches, global_matches, is_exact_global};
use crate::hash::{Digest, DigestError};
use crate::manifest::{Manifest, TrustRule};
pub use crate::scan::Global;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// How the operator wants violations handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Off,
    Record,
    Warn,
    Enforce,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "enforce" => Ok(Mode::Enforce),
            "warn" => Ok(Mode::Warn),
            "record" => Ok(Mode::Record),
            "off" => Ok(Mode::Off),
            _ => Err(format!(
                "unknown picklegate mode {text:?}; expected one of enforce, warn, record, off"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Record => "record",
            Mode::Warn => "warn",
            Mode::Enforce => "enforce",
        }
    }
}

/// Why a load (or a global) was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// No rule applies: mode `off`, or a mode that runs everything and reports.
    Unchecked,
    /// The bytes are listed in `[[allow]]` entry N for this callsite.
    Entry(usize),
    /// The callsite is a transport trusted by `[[trust]]` rule N and its globals fit.
    Trust(usize),
}

/// Why the operator's policy refuses a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `enforce` with no manifest: the global no-pickle mode.
    NoPolicy,
    /// The sha256 is not in the manifest and no `[[trust]]` rule covers the callsite.
    NotListed,
    /// The sha256 is listed, but for other callsites.
    WrongCallsite { listed_for: Vec<String> },
    /// A trusted transport's pickle resolves a global its rule does not list.
    UntrustedGlobal { rule: usize, global: String },
    /// A trusted transport's pickle could not be scanned, so its globals are unknown.
    Unscannable { rule: usize, reason: String },
    /// The backstop saw a global resolved by an unpickler that picklegate did not decide on.
    OutsideApprovedLoad { global: String },
    /// A global outside the `globals` list of the entry that approved the load.
    GlobalNotInEntry { entry: usize, global: String },
    /// A global only a `*` pattern admits, that resolves to something not defined in its module:
    /// a module, a name the module imported, an instance.
    NotDefinedThere { global: String },
}

/// How a list of global patterns admits one global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Named exactly (or the list is an `[[allow]]` entry's absent list: the reviewed bytes decide).
    Named,
    /// Only through a `*` pattern: it must resolve to a class or function defined in that module.
    Pattern,
}

/// How `patterns` admit the global `(module, name)`, if they do. A pattern never admits a dunder
/// name (`__getattr__`, `__builtins__`, `__class__`...): module machinery, not the module's API.
pub fn admission(patterns: &[String], module: &str, name: &str) -> Option<Admission> {
    let mut matching = patterns.iter().filter(|p| global_matches(p, module, name));
    let first = matching.next()?;
    if is_exact_global(first) || matching.any(|p| is_exact_global(p)) {
        Some(Admission::Named)
    } else if name
        .split('.')
        .any(|part| part.len() > 4 && part.starts_with("__") && part.ends_with("__"))
    {
        None
    } else {
        Some(Admission::Pattern)
    }
}

/// picklegate's own exceptions: plain messages and strings, safe to rebuild, so a refusal in a
/// worker travels back to its parent under any `[[trust]]` rule instead of breaking the transport.
pub const OWN_ERRORS: &[&str] = &[
    "PickleDeniedError",
    "NoPickleError",
    "BadTokenError",
    "PolicyError",
    "ScanError",
];

/// True for one of `OWN_ERRORS`, named exactly as picklegate defines it.
pub fn is_own_error(module: &str, name: &str) -> bool {
    module == "picklegate._errors" && OWN_ERRORS.contains(&name)
}

/// What to do with a load or a global, given the verdict and the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Run,
    /// Run it, and log the refusal the mode chose not to enforce (`warn`) or the load (`record`).
    RunAndReport,
    Refuse,
}

/// The outcome of judging one load or one global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Result<Approval, Refusal>,
    pub action: Action,
}

/// The facts about a load that the policy looks at.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    pub sha256: &'a Digest,
    pub callsite: &'a str,
}

/// The operator's layer: a mode and, optionally, a manifest.
#[derive(Debug, Clone)]
pub struct Policy {
    pub mode: Mode,
    pub manifest: Option<Arc<Manifest>>,
}

impl Policy {
    /// Judges a load. `scan_globals` is called only when a `[[trust]]` rule needs the globals.
    pub fn judge_load(
        &self,
        load: Load<'_>,
        scan_globals: impl FnOnce() -> Result<Vec<Global>, String>,
    ) -> Judgement {
        if self.mode == Mode::Off {
            return Judgement {
                verdict: Ok(Approval::Unchecked),
                action: Action::Run,
            };
        }
        let verdict = self.rule_for_load(load, scan_globals);
        let action = self.action_for(&verdict);
        Judgement { verdict, action }
    }

    fn rule_for_load(
        &self,
        load: Load<'_>,
        scan_globals: impl FnOnce() -> Result<Vec<Global>, String>,
    ) -> Result<Approval, Refusal> {
        let Some(manifest) = &self.manifest else {
            return Err(Refusal::NoPolicy);
        };
        let mut listed_for = Vec::new();
        for (index, entry) in manifest.entries_for(load.sha256) {
            if callsite_matches(&entry.callsite, load.callsite) {
                return Ok(Approval::Entry(index));
            }
            listed_for.push(entry.callsite.clone());
        }
        if let Some((index, rule)) = manifest.trust_for(load.callsite) {
            let globals = scan_globals().map_err(|reason| Refusal::Unscannable {
                rule: index,
                reason,
            })?;
            let fits = |(m, n): &&Global| rule.permits_global(m, n) || is_own_error(m, n);
            return match globals.iter().find(|g| !fits(g)) {
                Some((m, n)) => Err(Refusal::UntrustedGlobal {
                    rule: index,
                    global: format!("{m}.{n}"),
                }),
                None => Ok(Approval::Trust(index)),
            };
        }
        if listed_for.is_empty() {
            Err(Refusal::NotListed)
        } else {
            Err(Refusal::WrongCallsite { listed_for })
        }
    }

    fn action_for(&self, verdict: &Result<Approval, Refusal>) -> Action {
        match (self.mode, verdict) {
            (Mode::Off, _) => Action::Run,
            (Mode::Record, _) => Action::RunAndReport,
            (Mode::Warn, Ok(_)) => Action::Run,
            (Mode::Warn, Err(_)) => Action::RunAndReport,
            (Mode::Enforce, Ok(_)) => Action::Run,
            (Mode::Enforce, Err(_)) => Action::Refuse,
        }
    }

    /// True when `enforce` refuses every load at `callsite`, whatever its bytes: then a file need
    /// not be read into memory to be refused.
    pub fn refuses_any_bytes_at(&self, callsite: &str) -> bool {
        self.mode == Mode::Enforce
            && self
                .manifest
                .as_ref()
                .is_none_or(|m| !m.admits_anything_at(callsite))
    }

    /// The approval a load that runs carries into the backstop: in `warn` and `record`, a refused
    /// load still runs, and its globals are then only reported.
    pub fn approval_while_running(&self, judgement: &Judgement) -> Approval {
        judgement.verdict.clone().unwrap_or(Approval::Unchecked)
    }

    /// The backstop: judges a global resolved while `active` (the innermost load picklegate
    /// decided on this thread, if any) runs. `callsite` is computed only when needed, and
    /// `defined_there` (is the object it resolves to a class or function defined in that module?)
    /// only for a global that nothing but a `*` pattern admits.
    pub fn judge_global(
        &self,
        active: Option<Approval>,
        module: &str,
        name: &str,
        callsite: impl FnOnce() -> String,
        defined_there: impl FnOnce() -> bool,
    ) -> Judgement {
        if self.mode == Mode::Off {
            return Judgement {
                verdict: Ok(Approval::Unchecked),
                action: Action::Run,
            };
        }
        let global = || format!("{module}.{name}");
        let trusted = |rule: &TrustRule| {
            if is_own_error(module, name) {
                Some(Admission::Named)
            } else {
                admission(&rule.globals, module, name)
            }
        };
        let (verdict, how) = match (active, &self.manifest) {
            (Some(Approval::Unchecked), _) => (Ok(Approval::Unchecked), None),
            (Some(Approval::Entry(i)), Some(m)) => {
                let entry = m
                    .allow_entry(i)
                    .expect("an approval names an entry of its own manifest");
                // no `globals` key: the reviewed bytes may resolve anything; `globals = []`: nothing
                let how = match &entry.globals {
                    None => Some(Admission::Named),
                    Some(patterns) => admission(patterns, module, name),
                };
                match how {
                    Some(how) => (Ok(Approval::Entry(i)), Some(how)),
                    None => (
                        Err(Refusal::GlobalNotInEntry {
                            entry: i,
                            global: global(),
                        }),
                        None,
                    ),
                }
            }
            (Some(Approval::Entry(i)), None) => (
                Err(Refusal::GlobalNotInEntry {
                    entry: i,
                    global: global(),
                }),
                None,
            ),
            (Some(Approval::Trust(i)), Some(m)) => match trusted(&m.trust[i]) {
                Some(how) => (Ok(Approval::Trust(i)), Some(how)),
                None => (
                    Err(Refusal::UntrustedGlobal {
                        rule: i,
                        global: global(),
                    }),
                    None,
                ),
            },
            (Some(Approval::Trust(i)), None) => (
                Err(Refusal::UntrustedGlobal {
                    rule: i,
                    global: global(),
                }),
                None,
            ),
            (None, Some(m)) => match m.trust_for(&callsite()) {
                Some((i, rule)) => match trusted(rule) {
                    Some(how) => (Ok(Approval::Trust(i)), Some(how)),
                    None => (
                        Err(Refusal::UntrustedGlobal {
                            rule: i,
                            global: global(),
                        }),
                        None,
                    ),
                },
                None => (Err(Refusal::OutsideApprovedLoad { global: global() }), None),
            },
            (None, None) => (Err(Refusal::OutsideApprovedLoad { global: global() }), None),
        };
        let verdict = match how {
            Some(Admission::Pattern) if !defined_there() => {
                Err(Refusal::NotDefinedThere { global: global() })
            }
            _ => verdict,
        };
        let action = match (self.mode, &verdict) {
            (Mode::Record, Ok(_)) => Action::Run,
            _ => self.action_for(&verdict),
        };
        Judgement { verdict, action }
    }
}

/// One `install()` (or the environment's) request: a mode and the manifest it names, if any.
/// `host` marks the host-wide policy (`/etc/picklegate/policy.toml`, read by the preload library):
/// it outranks any other request of equal strictness, whichever came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub mode: Mode,
    pub manifest: Option<&'a str>,
    pub host: bool,
}

/// What a second request does to the one in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The request is stricter: it replaces the one in force, manifest, mode and record file.
    Replace,
    /// The request asks for what is in force already.
    Unchanged,
    /// The request would loosen the guard, or swap one manifest for another at the same
    /// strictness: it is ignored (and said so).
    Ignored,
    /// Two different manifests under `enforce`, neither the host's: neither contains the other,
    /// so keeping either would drop the other's limits. The second request fails, naming both.
    Conflict,
}

/// How strict a mode and manifest are: off, record, warn, enforce with a manifest, and enforce with
/// none (every load refused). Only `enforce` refuses anything, so it outranks every other mode.
pub fn strictness(mode: Mode, has_manifest: bool) -> u8 {
    match (mode, has_manifest) {
        (Mode::Off, _) => 0,
        (Mode::Record, _) => 1,
        (Mode::Warn, _) => 2,
        (Mode::Enforce, true) => 3,
        (Mode::Enforce, false) => 4,
    }
}

/// Settles a second request against the one in force, whatever their order: the stricter wins,
/// so a library that installs first cannot keep an application's later `enforce` from applying.
/// At equal strictness a request that adds a manifest where none was wins (it refuses nothing more
/// outside `enforce`, and names what is expected). Two different manifests under `enforce` conflict
/// (a library's looser manifest installed first must not stand in for the application's), unless
/// one is the host policy, which outranks the other.
pub fn settle(held: Request<'_>, wanted: Request<'_>) -> Settlement {
    if held.mode == wanted.mode && held.manifest == wanted.manifest && (held.host || !wanted.host) {
        return Settlement::Unchanged;
    }
    if held.mode == Mode::Enforce && wanted.mode == Mode::Enforce && !held.host && !wanted.host {
        if let (Some(_), Some(_)) = (held.manifest, wanted.manifest) {
            return Settlement::Conflict;
        }
    }
    let rank = |r: Request<'_>| strictness(r.mode, r.manifest.is_some());
    match rank(wanted).cmp(&rank(held)) {
        std::cmp::Ordering::Greater => Settlement::Replace,
        std::cmp::Ordering::Equal if wanted.host && !held.host => Settlement::Replace,
        std::cmp::Ordering::Equal
            if held.manifest.is_none() && wanted.mode == held.mode && !held.host =>
        {
            Settlement::Replace
        }
        _ => Settlement::Ignored,
    }
}

/// The record file an install of `mode` writes: `record` mode needs one (without it, its loads
/// would go unrecorded); every other mode writes none. A blank path names none.
pub fn record_file_for(mode: Mode, path: Option<&str>) -> Result<Option<&str>, String> {
    match (mode, path.filter(|p| !p.trim().is_empty())) {
        (Mode::Record, Some(path)) => Ok(Some(path)),
        (Mode::Record, None) => Err(
            "picklegate record mode needs a record file: set PICKLEGATE_RECORD=PATH or call install(mode=\"record\", record=PATH)".into(),
        ),
        _ => Ok(None),
    }
}

/// Settles an install against the gate in force: `held` is `None` when nothing is installed, or
/// only `no_pickles()` switched the interposer on (any install replaces that). Two spellings of
/// one manifest file (relative, through a link) are one manifest, not a conflict.
pub fn settle_install(held: Option<Request<'_>>, wanted: Request<'_>) -> Settlement {
    let Some(held) = held else {
        return Settlement::Replace;
    };
    match settle(held, wanted) {
        Settlement::Conflict if same_file(held.manifest, wanted.manifest) => Settlement::Unchanged,
        settlement => settlement,
    }
}

fn same_file(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.map(std::fs::canonicalize), b.map(std::fs::canonicalize)) {
        (Some(Ok(a)), Some(Ok(b))) => a == b,
        _ => false,
    }
}

/// The error of an install that `settle_install` found in `Conflict` with the one in force (set
/// by `held_by`: the code, the environment, the host).
pub fn install_conflict(held: Request<'_>, held_by: &str, wanted: Request<'_>) -> String {
    format!(
        "picklegate: install(mode=\"enforce\", policy={:?}) refused: the {held_by} already enforces the manifest {:?}; \
         two different manifests cannot both be in force, and keeping either would drop the other's limits. \
         Merge them into one manifest and install that",
        wanted.manifest.unwrap_or_default(),
        held.manifest.unwrap_or_default(),
    )
}

/// The warning of an install that `settle_install` `Ignored`.
pub fn install_ignored(held: Request<'_>, held_by: &str, wanted: Request<'_>) -> String {
    format!(
        "picklegate: install(mode={:?}, policy={:?}) ignored: already installed by the {held_by} with mode {:?} and policy {:?}, which is as strict or stricter; a later install can only make it stricter",
        wanted.mode.as_str(),
        wanted.manifest,
        held.mode.as_str(),
        held.manifest,
    )
}

impl Refusal {
    /// One sentence on what was refused, for messages and logs.
    pub fn describe(&self, manifest: Option<&Manifest>) -> String {
        match self {
            Refusal::NoPolicy => "no manifest is in force, so no rule allows any pickle (under enforce, every load is refused)".into(),
            Refusal::NotListed => "this pickle's sha256 is not in the manifest".into(),
            Refusal::WrongCallsite { listed_for } => format!(
                "this pickle's sha256 is in the manifest, but only for callsite(s) {}",
                listed_for.join(", ")
            ),
            Refusal::UntrustedGlobal { rule, global } => format!(
                "global {global} is not allowed by the [[trust]] rule{}",
                rule_location(manifest, |m| m.trust.get(*rule).map(|r| (r.line, r.callsite.clone())))
            ),
            Refusal::Unscannable { rule, reason } => format!(
                "the pickle could not be scanned for the [[trust]] rule{}: {reason}",
                rule_location(manifest, |m| m.trust.get(*rule).map(|r| (r.line, r.callsite.clone())))
            ),
            Refusal::OutsideApprovedLoad { global } => format!(
                "global {global} was resolved by an unpickler outside any approved load (backstop)"
            ),
            Refusal::NotDefinedThere { global } => format!(
                "global {global} matches only a `*` pattern, and what it resolves to is not a class or function defined in that module (a module, an imported name or an instance); list it by its exact name if it is safe"
            ),
            Refusal::GlobalNotInEntry { entry, global } => format!(
                "global {global} is not in the globals list of the [[allow]] entry{}{}",
                rule_location(manifest, |m| m.allow_entry(*entry).map(|e| (e.line, e.callsite.clone()))),
                if manifest.and_then(|m| m.allow_entry(*entry)).is_some_and(|e| e.globals.as_ref().is_some_and(Vec::is_empty)) {
                    " (`globals = []` admits no global; older freezes wrote it for files they could not scan: drop the key, or record and freeze again)"
                } else {
                    ""
                }
            ),
        }
    }
}

fn rule_location(
    manifest: Option<&Manifest>,
    find: impl Fn(&Manifest) -> Option<(usize, String)>,
) -> String {
    manifest
        .and_then(|m| {
            find(m).map(|(line, callsite)| format!(" for {callsite} at {}:{line}", m.source))
        })
        .unwrap_or_default()
}

/// Where a token was made or is used: the thread and the asyncio task (0 outside a task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub thread: u64,
    pub task: u64,
}

/// What the scope knows of a token passed to `allow_pickles`.
#[derive(Debug, Clone, Copy)]
pub struct TokenFacts {
    pub id: u64,
    pub origin: Origin,
    pub open: bool,
}

/// Why `allow_pickles()` refuses a token (`BadTokenError`); its text is the message users read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadToken {
    /// Not a token `no_pickles()` made; `repr` is the object's repr when it has one.
    NotAToken {
        repr: Option<String>,
    },
    Finished,
    OtherThread,
    OtherTask,
    NotInScope,
}

impl fmt::Display for BadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("allow_pickles() refused the token: ")?;
        match self {
            BadToken::NotAToken { repr } => write!(
                f,
                "{} is not a token made by picklegate.no_pickles()",
                repr.as_deref().unwrap_or("the object")
            ),
            BadToken::Finished => {
                f.write_str("the token's no_pickles() block has already finished")
            }
            BadToken::OtherThread => {
                f.write_str("the token was made by no_pickles() in another thread")
            }
            BadToken::OtherTask => {
                f.write_str("the token was made by no_pickles() in another asyncio task")
            }
            BadToken::NotInScope => {
                f.write_str("the token's no_pickles() block is not active in this context")
            }
        }
    }
}

/// An `only_objects` entry of `allow_pickles()` that is not a sha256 (`ValueError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOnlyObject {
    pub entry: String,
    pub error: DigestError,
}

impl fmt::Display for BadOnlyObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "only_objects entry {:?}: {}; write \"sha256:<64 hex digits>\"",
            self.entry, self.error
        )
    }
}

/// The hashes `allow_pickles(token, only_objects=[...])` admits, or the first entry that is none.
pub fn parse_only_objects(entries: &[String]) -> Result<HashSet<Digest>, BadOnlyObject> {
    entries
        .iter()
        .map(|entry| {
            Digest::parse(entry).map_err(|error| BadOnlyObject {
                entry: entry.clone(),
                error,
            })
        })
        .collect()
}

/// Why the code's own narrowing refuses a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRefusal {
    /// Inside a `no_pickles()` block that no `allow_pickles(token)` lifted.
    NoPickles,
    /// Inside `allow_pickles(token, only_objects=[...])` that does not list these bytes.
    NotInOnlyObjects,
}

#[derive(Debug)]
enum Layer {
    NoPickles {
        token: u64,
    },
    Allow {
        token: u64,
        only: Option<HashSet<Digest>>,
    },
}

#[derive(Debug)]
struct Node {
    layer: Layer,
    outer: Scope,
}

/// The code's narrowing, innermost layer first; immutable, so a context variable can hold it.
#[derive(Debug, Clone, Default)]
pub struct Scope(Option<Arc<Node>>);

impl Scope {
    pub fn is_open(&self) -> bool {
        self.0.is_none()
    }

    fn push(&self, layer: Layer) -> Scope {
        Scope(Some(Arc::new(Node {
            layer,
            outer: self.clone(),
        })))
    }

    fn layers(&self) -> impl Iterator<Item = &Layer> {
        let mut cursor = self.0.as_deref();
        std::iter::from_fn(move || {
            let node = cursor?;
            cursor = node.outer.0.as_deref();
            Some(&node.layer)
        })
    }

    /// Enters a `no_pickles()` block made with token `token`.
    pub fn no_pickles(&self, token: u64) -> Scope {
        self.push(Layer::NoPickles { token })
    }

    /// Enters `allow_pickles(token, only_objects)`, if the token may open a block here.
    pub fn allow(
        &self,
        token: TokenFacts,
        here: Origin,
        only: Option<HashSet<Digest>>,
    ) -> Result<Scope, BadToken> {
        if !token.open {
            return Err(BadToken::Finished);
        }
        if token.origin.thread != here.thread {
            return Err(BadToken::OtherThread);
        }
        if token.origin.task != here.task {
            return Err(BadToken::OtherTask);
        }
        if !self
            .layers()
            .any(|l| matches!(l, Layer::NoPickles { token: t } if *t == token.id))
        {
            return Err(BadToken::NotInScope);
        }
        Ok(self.push(Layer::Allow {
            token: token.id,
            only,
        }))
    }

    /// Whether a load of these bytes may run in this scope. `allow_pickles(token)` lifts only
    /// its own token's block, so it never opens more than was open outside that block.
    pub fn permits(&self, sha256: Option<&Digest>) -> Result<(), ScopeRefusal> {
        let mut lifted: Vec<u64> = Vec::new();
        for layer in self.layers() {
            match layer {
                Layer::Allow { token, only } => {
                    if let Some(only) = only {
                        if !sha256.is_some_and(|d| only.contains(d)) {
                            return Err(ScopeRefusal::NotInOnlyObjects);
                        }
                    }
                    lifted.push(*token);
                }
                Layer::NoPickles { token } if !lifted.contains(token) => {
                    return Err(ScopeRefusal::NoPickles)
                }
                Layer::NoPickles { .. } => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Origin = Origin { thread: 1, task: 0 };

    fn manifest(text: &str) -> Arc<Manifest> {
        Arc::new(Manifest::parse(&format!("version = 1\n{text}"), "m.toml").unwrap())
    }

    fn allow_entry(digest: &Digest, callsite: &str) -> String {
        format!("[[allow]]\nsha256 = \"{digest}\"\ncallsite = \"{callsite}\"\n")
    }

    fn no_scan() -> Result<Vec<Global>, String> {
        panic!("the globals should not be scanned here")
    }

    #[test]
    fn listed_pickle_at_its_callsite_runs_elsewhere_refused() {
        let d = Digest::of(b"model");
        let policy = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest(&allow_entry(&d, "app.serve:load_*"))),
        };
        let ok = policy.judge_load(
            Load {
                sha256: &d,
                callsite: "app.serve:load_model",
            },
            no_scan,
        );
        assert_eq!(
            ok,
            Judgement {
                verdict: Ok(Approval::Entry(0)),
                action: Action::Run
            }
        );
        let elsewhere = policy.judge_load(
            Load {
                sha256: &d,
                callsite: "app.other:f",
            },
            no_scan,
        );
        assert_eq!(elsewhere.action, Action::Refuse);
        assert_eq!(
            elsewhere.verdict,
            Err(Refusal::WrongCallsite {
                listed_for: vec!["app.serve:load_*".into()]
            })
        );
        let flipped = Digest::of(b"modeL");
        let other = policy.judge_load(
            Load {
                sha256: &flipped,
                callsite: "app.serve:load_model",
            },
            no_scan,
        );
        assert_eq!(other.verdict, Err(Refusal::NotListed));
    }

    #[test]
    fn enforce_without_manifest_refuses_everything_warn_reports_off_runs() {
        let d = Digest::of(b"x");
        let load = Load {
            sha256: &d,
            callsite: "a:b",
        };
        let enforce = Policy {
            mode: Mode::Enforce,
            manifest: None,
        };
        assert_eq!(
            enforce.judge_load(load, no_scan).verdict,
            Err(Refusal::NoPolicy)
        );
        assert_eq!(enforce.judge_load(load, no_scan).action, Action::Refuse);
        let warn = Policy {
            mode: Mode::Warn,
            manifest: None,
        };
        assert_eq!(warn.judge_load(load, no_scan).action, Action::RunAndReport);
        let off = Policy {
            mode: Mode::Off,
            manifest: None,
        };
        assert_eq!(off.judge_load(load, no_scan).action, Action::Run);
        let record = Policy {
            mode: Mode::Record,
            manifest: None,
        };
        assert_eq!(
            record.judge_load(load, no_scan).action,
            Action::RunAndReport
        );
    }

    #[test]
    fn trust_rules_bound_globals() {
        let policy = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest("[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"multiprocessing.pool.*\", \"app.tasks.*\"]\n")),
        };
        let d = Digest::of(b"task");
        let at = Load {
            sha256: &d,
            callsite: "multiprocessing.connection:Connection.recv",
        };
        let good = policy.judge_load(at, || Ok(vec![("app.tasks".into(), "square".into())]));
        assert_eq!(good.verdict, Ok(Approval::Trust(0)));
        let bad = policy.judge_load(at, || Ok(vec![("posix".into(), "system".into())]));
        assert_eq!(
            bad.verdict,
            Err(Refusal::UntrustedGlobal {
                rule: 0,
                global: "posix.system".into()
            })
        );
        let dotted = policy.judge_load(at, || Ok(vec![("app.tasks".into(), "os.system".into())]));
        assert_eq!(dotted.action, Action::Refuse);
        let broken = policy.judge_load(at, || Err("truncated".into()));
        assert!(matches!(broken.verdict, Err(Refusal::Unscannable { .. })));
        let elsewhere = policy.judge_load(
            Load {
                sha256: &d,
                callsite: "app:main",
            },
            no_scan,
        );
        assert_eq!(elsewhere.verdict, Err(Refusal::NotListed));
    }

    fn defined() -> bool {
        true
    }

    #[test]
    fn backstop_judges_globals() {
        let d = Digest::of(b"m");
        let text = format!(
            "{}globals = [\"collections.OrderedDict\"]\n[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"app.*\"]\n",
            allow_entry(&d, "app:load")
        );
        let policy = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest(&text)),
        };
        let never = || -> String { panic!("callsite not needed inside a decided load") };
        let unasked = || -> bool { panic!("an exactly named global needs no resolution") };
        assert_eq!(
            policy
                .judge_global(
                    Some(Approval::Entry(0)),
                    "collections",
                    "OrderedDict",
                    never,
                    unasked
                )
                .action,
            Action::Run
        );
        assert_eq!(
            policy
                .judge_global(Some(Approval::Entry(0)), "posix", "system", never, unasked)
                .action,
            Action::Refuse
        );
        assert_eq!(
            policy
                .judge_global(Some(Approval::Unchecked), "posix", "system", never, unasked)
                .action,
            Action::Run
        );
        let escaped = policy.judge_global(None, "posix", "system", || "app:main".into(), unasked);
        assert_eq!(
            escaped.verdict,
            Err(Refusal::OutsideApprovedLoad {
                global: "posix.system".into()
            })
        );
        let transport = policy.judge_global(
            None,
            "app",
            "f",
            || "multiprocessing.queues:SimpleQueue.get".into(),
            defined,
        );
        assert_eq!(transport.verdict, Ok(Approval::Trust(0)));
        let warn = Policy {
            mode: Mode::Warn,
            ..policy.clone()
        };
        assert_eq!(
            warn.judge_global(None, "posix", "system", || "app:main".into(), unasked)
                .action,
            Action::RunAndReport
        );
        let deny_all = Policy {
            mode: Mode::Enforce,
            manifest: None,
        };
        assert_eq!(
            deny_all
                .judge_global(None, "builtins", "dict", || "a:b".into(), unasked)
                .action,
            Action::Refuse
        );
    }

    #[test]
    fn a_pattern_admits_only_what_is_defined_in_its_module() {
        // issue 11, finding 1: `dask._expr.*` admitted the module `os` and an imported function
        let text = "[[trust]]\ncallsite = \"dist.*\"\nglobals = [\"dask._expr.*\", \"dask._expr.Expr._reconstruct\"]\n";
        let policy = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest(text)),
        };
        let at = || "dist.protocol:loads".to_string();
        let imported =
            policy.judge_global(Some(Approval::Trust(0)), "dask._expr", "os", at, || false);
        assert_eq!(
            imported.verdict,
            Err(Refusal::NotDefinedThere {
                global: "dask._expr.os".into()
            })
        );
        assert_eq!(imported.action, Action::Refuse);
        let own = policy.judge_global(
            Some(Approval::Trust(0)),
            "dask._expr",
            "LLGExpr",
            at,
            || true,
        );
        assert_eq!(own.verdict, Ok(Approval::Trust(0)));
        let unasked = || -> bool { panic!("an exactly named global needs no resolution") };
        let named = policy.judge_global(
            Some(Approval::Trust(0)),
            "dask._expr",
            "Expr._reconstruct",
            at,
            unasked,
        );
        assert_eq!(named.verdict, Ok(Approval::Trust(0)));
        // the same through the backstop at the transport's callsite, and in warn (reported)
        let outside = policy.judge_global(None, "dask._expr", "import_required", at, || false);
        assert_eq!(outside.action, Action::Refuse);
        let warn = Policy {
            mode: Mode::Warn,
            ..policy.clone()
        };
        assert_eq!(
            warn.judge_global(None, "dask._expr", "os", at, || false)
                .action,
            Action::RunAndReport
        );
        // an [[allow]] entry's pattern is held to the same rule; an entry without globals is not
        let d = Digest::of(b"m");
        let entries = format!(
            "{}globals = [\"app.*\"]\n{}",
            allow_entry(&d, "a:b"),
            allow_entry(&d, "c:d")
        );
        let listed = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest(&entries)),
        };
        let never = || -> String { panic!("callsite not needed inside a decided load") };
        assert_eq!(
            listed
                .judge_global(Some(Approval::Entry(0)), "app", "os", never, || false)
                .action,
            Action::Refuse
        );
        assert_eq!(
            listed
                .judge_global(Some(Approval::Entry(1)), "app", "os", never, unasked)
                .action,
            Action::Run
        );
    }

    #[test]
    fn picklegate_errors_cross_every_trust_rule() {
        let text = "[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"multiprocessing.pool.rebuild_exc\"]\n";
        let policy = Policy {
            mode: Mode::Enforce,
            manifest: Some(manifest(text)),
        };
        let d = Digest::of(b"result");
        let at = Load {
            sha256: &d,
            callsite: "multiprocessing.connection:_ConnectionBase.recv",
        };
        let error = (
            "picklegate._errors".to_string(),
            "PickleDeniedError".to_string(),
        );
        let back = policy.judge_load(at, || {
            Ok(vec![
                ("multiprocessing.pool".into(), "rebuild_exc".into()),
                error.clone(),
            ])
        });
        assert_eq!(back.verdict, Ok(Approval::Trust(0)));
        let unasked = || -> bool { panic!("picklegate's errors are named exactly") };
        let site = || "multiprocessing.connection:_ConnectionBase.recv".to_string();
        assert_eq!(
            policy
                .judge_global(Some(Approval::Trust(0)), &error.0, &error.1, site, unasked)
                .action,
            Action::Run
        );
        for other in ["_Refusal", "pickle", "os"] {
            assert_eq!(
                policy
                    .judge_global(
                        Some(Approval::Trust(0)),
                        "picklegate._errors",
                        other,
                        site,
                        || true
                    )
                    .action,
                Action::Refuse
            );
        }
        // outside a trust rule they are judged like any global
        let deny_all = Policy {
            mode: Mode::Enforce,
            manifest: None,
        };
        assert_eq!(
            deny_all
                .judge_global(None, &error.0, &error.1, site, unasked)
                .action,
            Action::Refuse
        );
    }

    #[test]
    fn admission_prefers_an_exact_name() {
        let patterns = vec!["app.*".to_string(), "app.f".to_string()];
        assert_eq!(admission(&patterns, "app", "f"), Some(Admission::Named));
        assert_eq!(admission(&patterns, "app", "g"), Some(Admission::Pattern));
        assert_eq!(admission(&patterns, "app.sub", "g"), None);
        assert_eq!(admission(&patterns, "app", "__getattr__"), None);
        assert_eq!(
            admission(&patterns, "app", "_private"),
            Some(Admission::Pattern)
        );
        let named = vec!["app.__getattr__".to_string()];
        assert_eq!(
            admission(&named, "app", "__getattr__"),
            Some(Admission::Named)
        );
    }

    #[test]
    fn refusal_regardless_of_bytes() {
        let d = Digest::of(b"m");
        let listed = manifest(&allow_entry(&d, "app:load"));
        let enforce = Policy {
            mode: Mode::Enforce,
            manifest: Some(listed.clone()),
        };
        assert!(enforce.refuses_any_bytes_at("app:other"));
        assert!(!enforce.refuses_any_bytes_at("app:load"));
        assert!(Policy {
            mode: Mode::Enforce,
            manifest: None
        }
        .refuses_any_bytes_at("app:load"));
        assert!(!Policy {
            mode: Mode::Warn,
            manifest: Some(listed)
        }
        .refuses_any_bytes_at("app:other"));
    }

    #[test]
    fn scope_no_pickles_and_allow() {
        let d = Digest::of(b"x");
        let open = Scope::default();
        assert!(open.is_open());
        assert_eq!(open.permits(Some(&d)), Ok(()));
        let token = TokenFacts {
            id: 7,
            origin: HERE,
            open: true,
        };
        let closed = open.no_pickles(7);
        assert_eq!(closed.permits(Some(&d)), Err(ScopeRefusal::NoPickles));
        let lifted = closed.allow(token, HERE, None).unwrap();
        assert_eq!(lifted.permits(Some(&d)), Ok(()));
        let only = closed
            .allow(token, HERE, Some([Digest::of(b"y")].into()))
            .unwrap();
        assert_eq!(only.permits(Some(&d)), Err(ScopeRefusal::NotInOnlyObjects));
        assert_eq!(only.permits(Some(&Digest::of(b"y"))), Ok(()));
        assert_eq!(only.permits(None), Err(ScopeRefusal::NotInOnlyObjects));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let scope = Scope::default().no_pickles(7);
        let facts = |open, origin| TokenFacts {
            id: 7,
            origin,
            open,
        };
        assert_eq!(
            scope.allow(facts(false, HERE), HERE, None).unwrap_err(),
            BadToken::Finished
        );
        let other_thread = Origin { thread: 2, task: 0 };
        assert_eq!(
            scope
                .allow(facts(true, other_thread), HERE, None)
                .unwrap_err(),
            BadToken::OtherThread
        );
        let other_task = Origin {
            thread: 1,
            task: 99,
        };
        assert_eq!(
            scope
                .allow(facts(true, other_task), HERE, None)
                .unwrap_err(),
            BadToken::OtherTask
        );
        let stranger = TokenFacts {
            id: 8,
            origin: HERE,
            open: true,
        };
        assert_eq!(
            scope.allow(stranger, HERE, None).unwrap_err(),
            BadToken::NotInScope
        );
    }

    #[test]
    fn each_token_refusal_says_allow_pickles_refused_the_token_and_why() {
        let said = |bad: BadToken| bad.to_string();
        let prefix = "allow_pickles() refused the token: ";
        assert_eq!(
            said(BadToken::NotAToken {
                repr: Some("42".into())
            }),
            format!("{prefix}42 is not a token made by picklegate.no_pickles()")
        );
        assert_eq!(
            said(BadToken::NotAToken { repr: None }),
            format!("{prefix}the object is not a token made by picklegate.no_pickles()")
        );
        assert_eq!(
            said(BadToken::Finished),
            format!("{prefix}the token's no_pickles() block has already finished")
        );
        assert_eq!(
            said(BadToken::OtherThread),
            format!("{prefix}the token was made by no_pickles() in another thread")
        );
        assert_eq!(
            said(BadToken::OtherTask),
            format!("{prefix}the token was made by no_pickles() in another asyncio task")
        );
        assert_eq!(
            said(BadToken::NotInScope),
            format!("{prefix}the token's no_pickles() block is not active in this context")
        );
    }

    #[test]
    fn only_objects_entries_must_be_sha256_and_a_bad_one_is_named() {
        let d = Digest::of(b"x");
        let good = [d.to_string(), format!("sha256:{d}")];
        assert_eq!(parse_only_objects(&good), Ok([d].into()));
        assert_eq!(parse_only_objects(&[]), Ok(HashSet::new()));
        let bad = parse_only_objects(&[d.to_string(), "sha256:abc".into()]).unwrap_err();
        assert_eq!(bad.entry, "sha256:abc");
        let message = bad.to_string();
        assert!(
            message.starts_with("only_objects entry \"sha256:abc\": "),
            "{message}"
        );
        assert!(
            message.ends_with("; write \"sha256:<64 hex digits>\""),
            "{message}"
        );
    }

    #[test]
    fn lifting_an_outer_token_does_not_lift_an_inner_block() {
        let d = Digest::of(b"x");
        let app = TokenFacts {
            id: 1,
            origin: HERE,
            open: true,
        };
        let scope = Scope::default()
            .no_pickles(1)
            .no_pickles(2)
            .allow(app, HERE, None)
            .unwrap();
        assert_eq!(scope.permits(Some(&d)), Err(ScopeRefusal::NoPickles));
        // An allow inside an only_objects block keeps the outer narrowing.
        let narrowed = Scope::default()
            .no_pickles(1)
            .allow(app, HERE, Some([Digest::of(b"y")].into()))
            .unwrap();
        let inner = TokenFacts {
            id: 3,
            origin: HERE,
            open: true,
        };
        let reopened = narrowed.no_pickles(3).allow(inner, HERE, None).unwrap();
        assert_eq!(
            reopened.permits(Some(&d)),
            Err(ScopeRefusal::NotInOnlyObjects)
        );
    }

    #[test]
    fn the_stricter_request_wins_whatever_the_order() {
        use Mode::*;
        let requests = [
            Request {
                mode: Off,
                manifest: None,
                host: false,
            },
            Request {
                mode: Record,
                manifest: None,
                host: false,
            },
            Request {
                mode: Warn,
                manifest: None,
                host: false,
            },
            Request {
                mode: Warn,
                manifest: Some("lib.toml"),
                host: false,
            },
            Request {
                mode: Enforce,
                manifest: Some("app.toml"),
                host: false,
            },
            Request {
                mode: Enforce,
                manifest: None,
                host: false,
            },
        ];
        let result = |held: Request<'static>, wanted: Request<'static>| match settle(held, wanted) {
            Settlement::Replace => wanted,
            Settlement::Unchanged | Settlement::Ignored | Settlement::Conflict => held,
        };
        let rank = |r: Request<'_>| strictness(r.mode, r.manifest.is_some());
        for a in requests {
            for b in requests {
                let strictest = rank(a).max(rank(b));
                assert_eq!(rank(result(a, b)), strictest, "{a:?} then {b:?}");
                if a.mode == Enforce || b.mode == Enforce {
                    assert_eq!(result(a, b).mode, Enforce, "{a:?} then {b:?}");
                }
            }
        }
    }

    #[test]
    fn enforce_with_a_manifest_outranks_every_other_mode() {
        let app = Request {
            mode: Mode::Enforce,
            manifest: Some("app.toml"),
            host: false,
        };
        for mode in [Mode::Off, Mode::Record, Mode::Warn] {
            assert_eq!(
                settle(
                    Request {
                        mode,
                        manifest: None,
                        host: false
                    },
                    app
                ),
                Settlement::Replace
            );
            assert_eq!(
                settle(
                    Request {
                        mode,
                        manifest: Some("lib.toml"),
                        host: false
                    },
                    app
                ),
                Settlement::Replace
            );
            assert_eq!(
                settle(
                    app,
                    Request {
                        mode,
                        manifest: None,
                        host: false
                    }
                ),
                Settlement::Ignored
            );
            assert_eq!(
                settle(
                    app,
                    Request {
                        mode,
                        manifest: Some("lib.toml"),
                        host: false
                    }
                ),
                Settlement::Ignored
            );
        }
        assert_eq!(
            settle(
                Request {
                    mode: Mode::Off,
                    manifest: None,
                    host: false
                },
                Request {
                    mode: Mode::Record,
                    manifest: None,
                    host: false
                }
            ),
            Settlement::Replace
        );
        assert_eq!(
            settle(
                Request {
                    mode: Mode::Warn,
                    manifest: None,
                    host: false
                },
                Request {
                    mode: Mode::Warn,
                    manifest: Some("a"),
                    host: false
                }
            ),
            Settlement::Replace
        );
        assert_eq!(
            settle(
                Request {
                    mode: Mode::Warn,
                    manifest: Some("a"),
                    host: false
                },
                Request {
                    mode: Mode::Warn,
                    manifest: None,
                    host: false
                }
            ),
            Settlement::Ignored
        );
        assert_eq!(settle(app, app), Settlement::Unchanged);
        // two different manifests under enforce: neither contains the other; the second fails loudly
        // in either order (red-team S4: a library's looser manifest first kept the application's out)
        let lib = Request {
            mode: Mode::Enforce,
            manifest: Some("lib.toml"),
            host: false,
        };
        assert_eq!(settle(app, lib), Settlement::Conflict);
        assert_eq!(settle(lib, app), Settlement::Conflict);
        // every load refused outranks any manifest
        let deny_all = Request {
            mode: Mode::Enforce,
            manifest: None,
            host: false,
        };
        assert_eq!(settle(app, deny_all), Settlement::Replace);
        assert_eq!(settle(deny_all, app), Settlement::Ignored);
    }

    #[test]
    fn the_host_policy_outranks_an_equal_request_in_either_order() {
        let host = Request {
            mode: Mode::Enforce,
            manifest: Some("/etc/picklegate/policy.toml"),
            host: true,
        };
        let env = Request {
            mode: Mode::Enforce,
            manifest: Some("env.toml"),
            host: false,
        };
        assert_eq!(settle(env, host), Settlement::Replace);
        assert_eq!(settle(host, env), Settlement::Ignored);
        let off = Request {
            mode: Mode::Off,
            manifest: None,
            host: false,
        };
        assert_eq!(settle(host, off), Settlement::Ignored);
        let deny_all = Request {
            mode: Mode::Enforce,
            manifest: None,
            host: false,
        };
        assert_eq!(settle(host, deny_all), Settlement::Replace);
        assert_eq!(settle(deny_all, host), Settlement::Ignored);
        assert_eq!(settle(host, host), Settlement::Unchanged);
    }

    #[test]
    fn an_install_over_nothing_or_an_implicit_gate_replaces_it() {
        let request = |mode| Request {
            mode,
            manifest: None,
            host: false,
        };
        for mode in [Mode::Off, Mode::Record, Mode::Warn, Mode::Enforce] {
            assert_eq!(settle_install(None, request(mode)), Settlement::Replace);
        }
        // install(mode="off") then install(mode="record", record=R): record wins, with its file
        assert_eq!(
            settle_install(Some(request(Mode::Off)), request(Mode::Record)),
            Settlement::Replace
        );
        assert_eq!(
            settle_install(Some(request(Mode::Record)), request(Mode::Off)),
            Settlement::Ignored
        );
    }

    #[test]
    fn record_mode_and_only_it_needs_a_record_file() {
        assert_eq!(
            record_file_for(Mode::Record, Some("r.jsonl")),
            Ok(Some("r.jsonl"))
        );
        for blank in [None, Some(""), Some("  ")] {
            let error = record_file_for(Mode::Record, blank).unwrap_err();
            assert!(error.contains("PICKLEGATE_RECORD=PATH"), "{error}");
        }
        for mode in [Mode::Off, Mode::Warn, Mode::Enforce] {
            assert_eq!(record_file_for(mode, Some("r.jsonl")), Ok(None));
        }
    }

    #[test]
    fn one_manifest_spelled_twice_is_no_conflict() {
        let dir = std::env::temp_dir().join(format!("picklegate-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "version = 1\n").unwrap();
        std::fs::write(dir.join("b.toml"), "version = 1\n").unwrap();
        let a = dir.join("a.toml").display().to_string();
        let a_again = dir.join(".").join("a.toml").display().to_string();
        let b = dir.join("b.toml").display().to_string();
        fn enforce(manifest: &str) -> Request<'_> {
            Request {
                mode: Mode::Enforce,
                manifest: Some(manifest),
                host: false,
            }
        }
        let held = Some(enforce(&a));
        assert_eq!(
            settle_install(held, enforce(&a_again)),
            Settlement::Unchanged
        );
        assert_eq!(settle_install(held, enforce(&b)), Settlement::Conflict);
        let message = install_conflict(enforce(&a), "environment", enforce(&b));
        assert!(message.contains("the environment already enforces the manifest"));
        assert!(message.contains(&format!("policy={b:?}")));
        let off = Request {
            mode: Mode::Off,
            manifest: None,
            host: false,
        };
        let warning = install_ignored(enforce(&a), "code", off);
        assert!(warning.starts_with("picklegate: install(mode=\"off\", policy=None) ignored: already installed by the code with mode \"enforce\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_parse_with_a_clear_error() {
        assert_eq!(Mode::parse("ENFORCE"), Ok(Mode::Enforce));
        let err = Mode::parse("strict").unwrap_err();
        assert!(
            err.contains("\"strict\"") && err.contains("enforce, warn, record, off"),
            "{err}"
        );
    }
}
