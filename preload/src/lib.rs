//! The LD_PRELOAD library (libc only; Python functions found with dlsym): in CPython it registers an
//! audit hook before start-up, then at the first event after start-up loads picklegate from beside it.
//! Listed in /etc/ld.so.preload with a root-owned /etc/picklegate/policy.toml, it guards every CPython
//! on the host whatever its flags and environment.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

// The CPython functions this library calls, found by name with dlsym: public C API with these
// signatures in every CPython from 3.8 on, checked on 3.9 to 3.14. The `PyObject *` and
// `PyCompilerFlags *` arguments are opaque here (`*mut c_void`): the library never looks inside.
/// `Py_AuditHookFunction`.
type AuditHook = unsafe extern "C" fn(*const c_char, *mut c_void, *mut c_void) -> c_int;
/// `PySys_AddAuditHook`.
type AddAuditHook = unsafe extern "C" fn(AuditHook, *mut c_void) -> c_int;
/// `Py_IsInitialized` (and `Py_Initialize`, looked up only to tell CPython from other programs).
type IsInitialized = unsafe extern "C" fn() -> c_int;
/// `PyRun_SimpleStringFlags`.
type RunString = unsafe extern "C" fn(*const c_char, *mut c_void) -> c_int;

/// What the hook needs once CPython runs: two C API functions and the bootstrap statement.
struct Interpreter {
    is_initialized: IsInitialized,
    run_string: RunString,
    bootstrap: CString,
}

static INTERPRETER: OnceLock<Interpreter> = OnceLock::new();

const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
/// The bootstrap runs once: the imports it makes raise audit events that must not start it again.
static STATE: AtomicU8 = AtomicU8::new(PENDING);
static SELF_CHECK_SEEN: AtomicBool = AtomicBool::new(false);
const SELF_CHECK: &[u8] = b"picklegate.preload-check";
/// The start-up script, shared with the `.pth` hook: it holds the rule for a process picklegate
/// cannot guard, whose two constants this library reads from its text (`EX_CONFIG`, `LENIENT`).
const STARTUP: &str = include_str!("../../python/picklegate/_startup.py");
/// Exit status when picklegate cannot be set up in `enforce`: `_startup.py`'s `EX_CONFIG`.
const EX_CONFIG: c_int = python_int(STARTUP.as_bytes(), b"\nEX_CONFIG = ");
/// The line of `_startup.py` that lists the modes that go on (see `lenient_modes`).
const LENIENT_LINE: &[u8] = b"\nLENIENT = (";
const _: () = assert!(
    find(STARTUP.as_bytes(), LENIENT_LINE, 0).is_some(),
    "_startup.py does not define LENIENT"
);
/// The host-wide policy: enforced in every CPython this library is preloaded into, whatever its
/// environment says. It (and its directory) must be owned by root and writable by no one else.
const HOST_POLICY: &str = "/etc/picklegate/policy.toml";
/// Set when the host policy is in play: then nothing is lenient, whatever PICKLEGATE_MODE says.
static HOST: AtomicBool = AtomicBool::new(false);

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    let host = Path::new(HOST_POLICY).symlink_metadata().is_ok();
    if !host && !configured() {
        return;
    }
    // SAFETY: `AddAuditHook` is the signature of `PySys_AddAuditHook` (see its declaration).
    let Some(add_audit_hook) = (unsafe { symbol::<AddAuditHook>(b"PySys_AddAuditHook\0") }) else {
        // SAFETY: only compared with None, never called (`Py_Initialize` takes no argument either).
        if unsafe { symbol::<IsInitialized>(b"Py_Initialize\0") }.is_some() {
            stop("this CPython predates audit hooks (3.8); picklegate needs CPython 3.9 or later");
        }
        return; // not CPython: stay invisible
    };
    // SAFETY: `IsInitialized` is the signature of `Py_IsInitialized`.
    let is_initialized = unsafe { symbol::<IsInitialized>(b"Py_IsInitialized\0") };
    // SAFETY: `RunString` is the signature of `PyRun_SimpleStringFlags`.
    let run_string = unsafe { symbol::<RunString>(b"PyRun_SimpleStringFlags\0") };
    let (Some(is_initialized), Some(run_string)) = (is_initialized, run_string) else {
        return stop("this CPython lacks Py_IsInitialized or PyRun_SimpleStringFlags");
    };
    if host {
        HOST.store(true, Ordering::SeqCst);
        if let Err(reason) = host_policy_is_root_owned() {
            return stop(&reason);
        }
    }
    let Some(package) = own_directory() else {
        return stop("cannot find the directory of its own library (dladdr failed)");
    };
    let bootstrap =
        CString::new(bootstrap_statement(&package, host)).expect("hex digits contain no NUL");
    let _ = INTERPRETER.set(Interpreter {
        is_initialized,
        run_string,
        bootstrap,
    });
    // SAFETY: PEP 578 allows adding a hook before `Py_Initialize` (here: a constructor, on the
    // only thread); `hook` has the `Py_AuditHookFunction` signature, and what it reads
    // (INTERPRETER) is set above.
    if unsafe { add_audit_hook(hook, std::ptr::null_mut()) } != 0 {
        stop("PySys_AddAuditHook refused its hook");
    }
}

/// True when the operator asked for picklegate; empty values count as unset, as for `PYTHON*`.
fn configured() -> bool {
    ["PICKLEGATE_POLICY", "PICKLEGATE_MODE"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The host policy file and its directory: not symlinks, owned by root, writable by no one else.
fn host_policy_is_root_owned() -> Result<(), String> {
    let file = Path::new(HOST_POLICY);
    let directory = file.parent().expect("the host policy has a directory");
    for (path, want_dir) in [(directory, true), (file, false)] {
        let meta = path
            .symlink_metadata()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let kind_ok = if want_dir {
            meta.is_dir()
        } else {
            meta.is_file()
        };
        if !kind_ok {
            let kind = if want_dir {
                "a directory"
            } else {
                "a regular file"
            };
            return Err(format!(
                "{} is not {kind} (symlinks are refused)",
                path.display()
            ));
        }
        if meta.uid() != 0 {
            return Err(format!(
                "{} is owned by uid {}, not by root",
                path.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by others than root (mode {:o})",
                path.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// The modes of `_startup.py`'s `LENIENT` carry on when picklegate cannot be set up; `enforce`
/// stops, and so does every process under the host policy.
fn lenient() -> bool {
    if HOST.load(Ordering::SeqCst) {
        return false;
    }
    let mode = std::env::var("PICKLEGATE_MODE").unwrap_or_default();
    lenient_modes().any(|lenient| lenient == mode.trim().to_ascii_lowercase())
}

/// The strings of the `LENIENT = ("warn", ...)` line of `_startup.py`.
fn lenient_modes() -> impl Iterator<Item = &'static str> {
    let start = find(STARTUP.as_bytes(), LENIENT_LINE, 0).map_or(STARTUP.len(), |at| at + 1);
    let line = STARTUP[start..].lines().next().unwrap_or("");
    line.split('"').skip(1).step_by(2)
}

/// Where `needle` first occurs in `haystack` at or after `from` (usable in constants).
const fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + needle.len() <= haystack.len() {
        let mut i = 0;
        while i < needle.len() && haystack[at + i] == needle[i] {
            i += 1;
        }
        if i == needle.len() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// The integer a Python source assigns on the line that starts with `prefix`: fails the build if none.
const fn python_int(source: &[u8], prefix: &[u8]) -> c_int {
    let Some(at) = find(source, prefix, 0) else {
        panic!("_startup.py does not define the constant");
    };
    let mut i = at + prefix.len();
    let mut value: c_int = 0;
    while i < source.len() && source[i].is_ascii_digit() {
        value = value * 10 + (source[i] - b'0') as c_int;
        i += 1;
    }
    assert!(
        i > at + prefix.len(),
        "the constant in _startup.py is not a number"
    );
    value
}

/// Reports a failure to set picklegate up; in `enforce` the process stops rather than run unguarded.
fn stop(reason: &str) {
    if lenient() {
        eprintln!("picklegate preload: {reason}; WARNING: this process runs UNGUARDED");
    } else {
        eprintln!("picklegate preload: {reason}; stopping, rather than run unguarded");
        // SAFETY: `_exit` ends the process at once; nothing here needs unwinding or flushing
        // (eprintln! is unbuffered).
        unsafe { libc::_exit(EX_CONFIG) };
    }
}

/// A function of the running process by name (`name` ends with NUL), or `None`.
///
/// # Safety
/// `F` is a function pointer type, the signature of the C function `name`.
unsafe fn symbol<F>(name: &[u8]) -> Option<F> {
    let name = CStr::from_bytes_with_nul(name).ok()?;
    // SAFETY: `name` is a C string; dlsym only reads the loaded objects' symbol tables.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    // SAFETY: a non-null address of the function `name`, and `F` its pointer type (the caller's
    // guarantee), which has a data pointer's size on every platform this builds for.
    (!address.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) })
}

/// The picklegate package directory: where this library is installed.
fn own_directory() -> Option<PathBuf> {
    // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `constructor` is code of this library, so dladdr can describe it into `info`.
    let found = unsafe { libc::dladdr(constructor as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: a non-null `dli_fname` is the NUL-terminated path of this library, which stays
    // loaded (it is running).
    let file = OsStr::from_bytes(unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes());
    // Resolve a relative LD_PRELOAD path now, before the program can change directory.
    std::fs::canonicalize(file)
        .ok()?
        .parent()
        .map(PathBuf::from)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One expression statement, so nothing is bound in `__main__`: raises the self-check event, then
/// runs `_startup.py` on the package beside this library; hex keeps any path byte intact.
fn bootstrap_statement(package: &Path, host: bool) -> String {
    let host_policy = if host {
        format!("'{HOST_POLICY}'")
    } else {
        "None".to_string()
    };
    format!(
        "__import__('sys').audit('{}') or exec(bytes.fromhex('{}').decode(), {{'__name__': 'picklegate-start', 'LOCATION': __import__('os').fsdecode(bytes.fromhex('{}')), 'HOST_POLICY': {host_policy}}})",
        std::str::from_utf8(SELF_CHECK).expect("ASCII"),
        hex(STARTUP.as_bytes()),
        hex(package.as_os_str().as_bytes())
    )
}

/// The program is about to run (`cpython.run_*`), or an embedding application imports a module
/// after `Py_Initialize` finished: from here on, Python code may run.
fn started(event: &[u8], interpreter: &Interpreter) -> bool {
    event.starts_with(b"cpython.run_")
        // SAFETY: `Py_IsInitialized` takes nothing and may be called at any time, even before
        // `Py_Initialize`.
        || (event == b"import" && unsafe { (interpreter.is_initialized)() } != 0)
}

/// # Safety
/// Called by CPython only, as a PEP 578 hook: `event` is a C string, the GIL (or the only thread
/// of a starting runtime) is held.
unsafe extern "C" fn hook(
    event: *const c_char,
    _args: *mut c_void,
    _user_data: *mut c_void,
) -> c_int {
    // SAFETY: CPython passes the event name as a NUL-terminated string that outlives the call.
    let event = unsafe { CStr::from_ptr(event) }.to_bytes();
    if event == SELF_CHECK {
        SELF_CHECK_SEEN.store(true, Ordering::SeqCst);
        return 0;
    }
    if STATE.load(Ordering::Acquire) != PENDING {
        return 0;
    }
    let Some(interpreter) = INTERPRETER.get() else {
        return 0;
    };
    if !started(event, interpreter)
        || STATE
            .compare_exchange(PENDING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return 0;
    }
    // SAFETY: the runtime has started (`started`) and audit hooks run with the GIL held, as
    // `PyRun_SimpleStringFlags` needs; `bootstrap` is a NUL-terminated C string; null flags are
    // allowed. STATE (now RUNNING) keeps the events it raises from running it again.
    let status =
        unsafe { (interpreter.run_string)(interpreter.bootstrap.as_ptr(), std::ptr::null_mut()) };
    STATE.store(DONE, Ordering::Release);
    if status != 0 {
        stop("the bootstrap raised an exception (printed above)");
    } else if !SELF_CHECK_SEEN.load(Ordering::SeqCst) {
        stop("its audit hook did not see its own check event");
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Python reads in `_startup.py` is what this library reads.
    #[test]
    fn reads_the_rule_python_runs() {
        let python = std::process::Command::new("python3")
            .args(["-c", "import sys; g = {}; exec(sys.stdin.read(), g); print(g['EX_CONFIG'], *g['LENIENT'])"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("piped").write_all(STARTUP.as_bytes())?;
                child.wait_with_output()
            })
            .expect("python3 runs");
        let printed = String::from_utf8(python.stdout).expect("UTF-8");
        let ours = std::iter::once(EX_CONFIG.to_string())
            .chain(lenient_modes().map(str::to_string))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(printed.trim(), ours);
        assert_eq!(ours, "78 warn record off");
    }
}
