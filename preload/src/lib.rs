//! The LD_PRELOAD library (libc only; Python functions found with dlsym): in CPython it registers an
//! audit hook before start-up, then at the first event after start-up loads picklegate from beside it.
//! Listed in /etc/ld.so.preload with a root-owned /etc/picklegate/policy.toml, it guards every CPython
//! on the host whatever its flags and environment. It also watches `dlopen` (a libpython loaded
//! later) and `Py_Initialize*` (a runtime started again after `Py_FinalizeEx`).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

// The CPython functions this library calls, found by name with dlsym: public C API with these
// signatures in every CPython from 3.8 on, checked on 3.9 to 3.14. The `PyObject *` and
// `PyCompilerFlags *` arguments are opaque here (`*mut c_void`): the library never looks inside.
/// `Py_AuditHookFunction`.
type AuditHook = unsafe extern "C" fn(*const c_char, *mut c_void, *mut c_void) -> c_int;
/// `PySys_AddAuditHook`.
type AddAuditHook = unsafe extern "C" fn(AuditHook, *mut c_void) -> c_int;
/// `Py_IsInitialized`.
type IsInitialized = unsafe extern "C" fn() -> c_int;
/// `Py_Initialize`.
type Initialize = unsafe extern "C" fn();
/// `Py_InitializeEx`.
type InitializeEx = unsafe extern "C" fn(c_int);
/// `Py_InitializeFromConfig`: the `PyConfig *` is opaque; the status comes back by value.
type InitializeFromConfig = unsafe extern "C" fn(*const c_void) -> PyStatus;
/// `dlopen`.
type Dlopen = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
/// A load (name, flags) as `dlopen` or `dlmopen` into one namespace does it.
type Loader<'a> = &'a dyn Fn(*const c_char, c_int) -> *mut c_void;

/// CPython's `PyStatus` (3.8 to 3.14: an enum, two C strings, an int), only passed through.
#[repr(C)]
pub struct PyStatus {
    kind: c_int,
    func: *const c_char,
    err_msg: *const c_char,
    exitcode: c_int,
}
/// `PyRun_SimpleStringFlags`.
type RunString = unsafe extern "C" fn(*const c_char, *mut c_void) -> c_int;
/// `Py_OpenCodeHookFunction`: a path object in, an open file object (or NULL) out.
type OpenCodeHook = unsafe extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void;
/// `PyFile_SetOpenCodeHook`.
type SetOpenCodeHook = unsafe extern "C" fn(OpenCodeHook, *mut c_void) -> c_int;

/// What the hook needs once CPython runs: two C API functions and the bootstrap statement.
struct Interpreter {
    is_initialized: IsInitialized,
    run_string: RunString,
    set_open_code_hook: Option<SetOpenCodeHook>,
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
    HOST.store(host, Ordering::SeqCst);
    ACTIVE.store(true, Ordering::SeqCst);
    // SAFETY: RTLD_DEFAULT is a valid scope for dlsym.
    unsafe { arm(libc::RTLD_DEFAULT) };
}

/// Set by the constructor when picklegate is asked for (host policy or environment): only then do
/// `dlopen` and `Py_Initialize*` look further than forwarding to the real functions.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set once a CPython was found (armed, or stopped): later loads need no look.
static FOUND: AtomicBool = AtomicBool::new(false);
/// One thread at a time looks for CPython (two `dlopen`s at once must not register two hooks).
static LOOKING: Mutex<()> = Mutex::new(());
/// The `dlopen` handle libpython was found through (null: it was there at start-up).
static LIBPYTHON: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// Set when a runtime this library guarded is finalized (`cpython._PySys_ClearAuditHooks`): its
/// hooks are gone, so a runtime started again would run unguarded.
static FINALIZED: AtomicBool = AtomicBool::new(false);
const HOOKS_CLEARED: &[u8] = b"cpython._PySys_ClearAuditHooks";

/// Looks for CPython in `scope` (RTLD_DEFAULT, or a handle `dlopen` returned) and, when it is
/// there, registers the hook before the runtime starts. True when CPython was found.
///
/// # Safety
/// `scope` is RTLD_DEFAULT or a handle returned by `dlopen` and not closed.
unsafe fn arm(scope: *mut c_void) -> bool {
    // SAFETY: `AddAuditHook` is the signature of `PySys_AddAuditHook` (see its declaration);
    // `scope` is valid (the caller's guarantee).
    let add_audit_hook = unsafe { symbol_in::<AddAuditHook>(scope, b"PySys_AddAuditHook\0") };
    // SAFETY: `IsInitialized` is the signature of `Py_IsInitialized`.
    let is_initialized = unsafe { symbol_in::<IsInitialized>(scope, b"Py_IsInitialized\0") };
    let Some(add_audit_hook) = add_audit_hook else {
        if is_initialized.is_some() {
            FOUND.store(true, Ordering::SeqCst);
            stop("this CPython predates audit hooks (3.8); picklegate needs CPython 3.9 or later");
        }
        return false; // not CPython: stay invisible
    };
    FOUND.store(true, Ordering::SeqCst);
    // SAFETY: `RunString` is the signature of `PyRun_SimpleStringFlags`.
    let run_string = unsafe { symbol_in::<RunString>(scope, b"PyRun_SimpleStringFlags\0") };
    let (Some(is_initialized), Some(run_string)) = (is_initialized, run_string) else {
        stop("this CPython lacks Py_IsInitialized or PyRun_SimpleStringFlags");
        return true;
    };
    let host = HOST.load(Ordering::SeqCst);
    if host {
        if let Err(reason) = host_policy_is_root_owned() {
            stop(&reason);
            return true;
        }
    }
    // SAFETY: `Py_IsInitialized` takes nothing and may be called at any time.
    if unsafe { is_initialized() } != 0 {
        // A libpython a `dlopen` brought in that something already started (a constructor):
        // its start-up ran without the hook.
        stop("a CPython loaded with dlopen was already initialized when picklegate saw it, so it cannot be guarded from its start");
        return true;
    }
    let Some(package) = own_directory() else {
        stop("cannot find the directory of its own library (dladdr failed)");
        return true;
    };
    let bootstrap =
        CString::new(bootstrap_statement(&package, host)).expect("hex digits contain no NUL");
    // SAFETY: `SetOpenCodeHook` is the signature of `PyFile_SetOpenCodeHook`.
    let set_open_code_hook =
        unsafe { symbol_in::<SetOpenCodeHook>(scope, b"PyFile_SetOpenCodeHook\0") };
    let _ = INTERPRETER.set(Interpreter {
        is_initialized,
        run_string,
        set_open_code_hook,
        bootstrap,
    });
    // SAFETY: PEP 578 allows adding a hook before `Py_Initialize` (checked just above: the
    // runtime has not started, so no other thread runs Python); `hook` has the
    // `Py_AuditHookFunction` signature, and what it reads (INTERPRETER) is set above.
    if unsafe { add_audit_hook(hook, std::ptr::null_mut()) } != 0 {
        stop("PySys_AddAuditHook refused its hook");
    }
    true
}

/// The real `dlopen` (the next object's: libc's), found once.
fn real_dlopen() -> Option<Dlopen> {
    static REAL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    let mut address = REAL.load(Ordering::Acquire);
    if address.is_null() {
        // SAFETY: a NUL-terminated name; RTLD_NEXT asks for the definition after this library's.
        address = unsafe { libc::dlsym(libc::RTLD_NEXT, b"dlopen\0".as_ptr().cast()) };
        REAL.store(address, Ordering::Release);
    }
    // SAFETY: a non-null address of libc's `dlopen`, whose signature `Dlopen` is.
    (!address.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Dlopen>(address) })
}

/// `dlopen`, as libc's, and then: a libpython it brought in (uWSGI, mod_wsgi, PyInstaller, an
/// embedding program) is armed like one there at start-up, before anything can initialize it.
///
/// # Safety
/// As libc's `dlopen`: `filename` is null or a C string.
#[no_mangle]
pub unsafe extern "C" fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void {
    let Some(real) = real_dlopen() else {
        return std::ptr::null_mut();
    };
    // SAFETY: `load_as_caller` passes null or a C string, and flags, as libc's `dlopen` takes them.
    let load = |name: *const c_char, flags: c_int| unsafe { real(name, flags) };
    // SAFETY: the caller's guarantee is libc's.
    let handle = unsafe { load_as_caller(&load, false, filename, flags) };
    look_for_cpython(handle);
    handle
}

/// `dlmopen`, as libc's, and then as `dlopen`: a libpython loaded into a namespace of its own.
///
/// # Safety
/// As libc's `dlmopen`: `filename` is a C string.
#[cfg(target_env = "gnu")]
#[no_mangle]
pub unsafe extern "C" fn dlmopen(
    namespace: libc::Lmid_t,
    filename: *const c_char,
    flags: c_int,
) -> *mut c_void {
    static REAL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    let mut address = REAL.load(Ordering::Acquire);
    if address.is_null() {
        // SAFETY: a NUL-terminated name; RTLD_NEXT asks for the definition after this library's.
        address = unsafe { libc::dlsym(libc::RTLD_NEXT, b"dlmopen\0".as_ptr().cast()) };
        REAL.store(address, Ordering::Release);
    }
    if address.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: a non-null address of libc's `dlmopen`, whose signature this is.
    let real = unsafe {
        std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(libc::Lmid_t, *const c_char, c_int) -> *mut c_void,
        >(address)
    };
    // SAFETY: `load_as_caller` passes a C string and flags, as libc's `dlmopen` takes them.
    let load = |name: *const c_char, flags: c_int| unsafe { real(namespace, name, flags) };
    // SAFETY: the caller's guarantee is libc's.
    let handle = unsafe { load_as_caller(&load, namespace == LM_ID_NEWLM, filename, flags) };
    look_for_cpython(handle);
    handle
}

/// glibc's `LM_ID_NEWLM` (dlfcn.h): `dlmopen` into a new namespace.
#[cfg(target_env = "gnu")]
const LM_ID_NEWLM: libc::Lmid_t = -1;

/// After a successful load, in a process that asked for picklegate and has no CPython yet: arm
/// a libpython it brought in.
fn look_for_cpython(handle: *mut c_void) {
    if handle.is_null() || !ACTIVE.load(Ordering::SeqCst) || FOUND.load(Ordering::SeqCst) {
        return;
    }
    let _looking = LOOKING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !FOUND.load(Ordering::SeqCst) {
        // SAFETY: `handle` was just returned by `dlopen`/`dlmopen`; RTLD_DEFAULT is always
        // valid. The handle first: a library loaded RTLD_LOCAL is not in the default scope.
        if unsafe { arm(handle) } {
            LIBPYTHON.store(handle, Ordering::SeqCst);
        } else {
            // SAFETY: as above.
            unsafe { arm(libc::RTLD_DEFAULT) };
        }
    }
    // The look-ups that found nothing left a dlerror message the caller did not cause.
    // SAFETY: dlerror only reads and clears this thread's message.
    unsafe { libc::dlerror() };
}

/// libc's `dlopen` decides where a bare name is searched (the calling object's RUNPATH/RPATH) and
/// what `$ORIGIN` means from the object that called it, which is now this library: for those
/// names, find the program's calling object and search as libc would have for it.
///
/// `real` loads (libc's `dlopen`, or `dlmopen` into one namespace); `fresh` when that namespace is
/// a new one, where nothing is loaded yet.
///
/// # Safety
/// As libc's `dlopen`: `filename` is null or a C string.
#[cfg(target_env = "gnu")]
unsafe fn load_as_caller(
    real: Loader,
    fresh: bool,
    filename: *const c_char,
    flags: c_int,
) -> *mut c_void {
    if filename.is_null() {
        // A null name is the main program, whoever asks.
        return real(filename, flags);
    }
    // SAFETY: a non-null `filename` is a C string (the caller's guarantee).
    let name = unsafe { CStr::from_ptr(filename) }.to_bytes();
    let bare = !name.contains(&b'/');
    let origin = find(name, b"$ORIGIN", 0).is_some() || find(name, b"${ORIGIN}", 0).is_some();
    if !bare && !origin {
        // A path, the same from every caller.
        return real(filename, flags);
    }
    let Some(caller) = calling_object() else {
        // As libc's, with this library as the caller (the best left).
        return real(filename, flags);
    };
    if origin {
        let Some(directory) = origin_of(caller) else {
            // As above.
            return real(filename, flags);
        };
        let mut expanded = name.to_vec();
        for token in [&b"${ORIGIN}"[..], b"$ORIGIN"] {
            while let Some(at) = find(&expanded, token, 0) {
                expanded.splice(at..at + token.len(), directory.iter().copied());
            }
        }
        let Ok(expanded) = CString::new(expanded) else {
            // As above.
            return real(filename, flags);
        };
        // The name with the caller's origin in place of `$ORIGIN`.
        return real(expanded.as_ptr(), flags);
    }
    // Already loaded under that name: libc returns it before any search (RTLD_NOLOAD only looks
    // among loaded objects; a new namespace has none).
    if !fresh {
        let loaded = real(filename, flags | libc::RTLD_NOLOAD);
        if !loaded.is_null() {
            return loaded;
        }
    }
    for directory in callers_own_directories(caller) {
        let mut path = directory;
        path.push(b'/');
        path.extend_from_slice(name);
        let Ok(path) = CString::new(path) else {
            continue;
        };
        // SAFETY: `path` is a C string; access only asks whether the file exists.
        if unsafe { libc::access(path.as_ptr(), libc::F_OK) } != 0 {
            continue;
        }
        let handle = real(path.as_ptr(), flags);
        if !handle.is_null() {
            return handle;
        }
    }
    // The rest (the program's RPATH, LD_LIBRARY_PATH, the cache, the system directories) is the
    // same for every caller.
    real(filename, flags)
}

/// Elsewhere: as libc's, with this library as the caller.
///
/// # Safety
/// As libc's `dlopen`: `filename` is null or a C string.
#[cfg(not(target_env = "gnu"))]
unsafe fn load_as_caller(
    real: Loader,
    _fresh: bool,
    filename: *const c_char,
    flags: c_int,
) -> *mut c_void {
    real(filename, flags)
}

/// glibc's `dladdr1` request for the link map (dlfcn.h; not in the libc crate).
#[cfg(target_env = "gnu")]
const RTLD_DL_LINKMAP: c_int = 2;

/// The link map (glibc: the handle) of the object whose code called `dlopen`: the first frame
/// up the stack outside this library.
#[cfg(target_env = "gnu")]
fn calling_object() -> Option<*mut c_void> {
    extern "C" {
        fn _Unwind_Backtrace(
            trace: extern "C" fn(*mut c_void, *mut c_void) -> c_int,
            data: *mut c_void,
        ) -> c_int;
        fn _Unwind_GetIP(context: *mut c_void) -> usize;
    }
    struct Walk {
        own_base: *mut c_void,
        seen_own: bool,
        caller: Option<*mut c_void>,
    }
    extern "C" fn frame(context: *mut c_void, data: *mut c_void) -> c_int {
        const CONTINUE: c_int = 0; // _URC_NO_REASON
        const STOP: c_int = 4; // _URC_NORMAL_STOP
                               // SAFETY: `data` is the `Walk` `calling_object` passes, alive during the walk.
        let walk = unsafe { &mut *data.cast::<Walk>() };
        // SAFETY: `context` is the unwinder's, valid during this callback.
        let ip = unsafe { _Unwind_GetIP(context) };
        if ip == 0 {
            return STOP;
        }
        // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        let mut map: *mut c_void = std::ptr::null_mut();
        // SAFETY: dladdr1 only describes the address (one before the return address: inside
        // the call) into `info` and `map`.
        let found = unsafe {
            libc::dladdr1(
                (ip - 1) as *const c_void,
                &mut info,
                &mut map,
                RTLD_DL_LINKMAP,
            )
        };
        if found == 0 {
            return CONTINUE;
        }
        if info.dli_fbase == walk.own_base {
            walk.seen_own = true;
            return CONTINUE;
        }
        if !walk.seen_own {
            return CONTINUE; // the unwinder's own frames
        }
        walk.caller = (!map.is_null()).then_some(map);
        STOP
    }
    // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
    let mut own: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `constructor` is code of this library, so dladdr can describe it into `own`.
    if unsafe { libc::dladdr(constructor as *const c_void, &mut own) } == 0 {
        return None;
    }
    let mut walk = Walk {
        own_base: own.dli_fbase,
        seen_own: false,
        caller: None,
    };
    // SAFETY: `frame` has the callback's signature and reads `walk` only during the call.
    unsafe { _Unwind_Backtrace(frame, (&mut walk as *mut Walk).cast()) };
    walk.caller
}

/// The caller's search path up to the part it shares with this library's (which has no RPATH or
/// RUNPATH): glibc looks in the cache before those shared system directories, so libc's `dlopen`
/// searches them, after the caller's own.
#[cfg(target_env = "gnu")]
fn callers_own_directories(caller: *mut c_void) -> Vec<Vec<u8>> {
    let mut callers = search_path(caller);
    let own = own_map().map(search_path).unwrap_or_default();
    let shared = callers
        .iter()
        .rev()
        .zip(own.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    callers.truncate(callers.len() - shared);
    callers
}

/// This library's link map (glibc: its handle).
#[cfg(target_env = "gnu")]
fn own_map() -> Option<*mut c_void> {
    // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut map: *mut c_void = std::ptr::null_mut();
    // SAFETY: `constructor` is code of this library, so dladdr1 can describe it.
    let found = unsafe {
        libc::dladdr1(
            constructor as *const c_void,
            &mut info,
            &mut map,
            RTLD_DL_LINKMAP,
        )
    };
    (found != 0 && !map.is_null()).then_some(map)
}

/// `$ORIGIN` of the object `map`: the directory it was loaded from.
#[cfg(target_env = "gnu")]
fn origin_of(map: *mut c_void) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `map` is a loaded object's link map, which glibc takes as its handle; RTLD_DI_ORIGIN
    // writes at most PATH_MAX bytes and a NUL.
    if unsafe { libc::dlinfo(map, libc::RTLD_DI_ORIGIN, buffer.as_mut_ptr().cast()) } != 0 {
        return None;
    }
    let end = buffer.iter().position(|&b| b == 0)?;
    buffer.truncate(end);
    Some(buffer)
}

/// The directories glibc searches for a library the object `map` asks for by name: its RPATH
/// and its loaders', LD_LIBRARY_PATH, its RUNPATH, the system directories (`RTLD_DI_SERINFO`).
#[cfg(target_env = "gnu")]
fn search_path(map: *mut c_void) -> Vec<Vec<u8>> {
    /// `Dl_serpath`.
    #[repr(C)]
    struct SearchDirectory {
        name: *const c_char,
        flags: std::ffi::c_uint,
    }
    /// `Dl_serinfo`'s head, followed by `count` `Dl_serpath`s and their strings.
    #[repr(C)]
    struct SearchInfo {
        size: usize,
        count: std::ffi::c_uint,
    }
    let mut head = SearchInfo { size: 0, count: 0 };
    // SAFETY: `map` is a loaded object's link map (glibc's handle); SERINFOSIZE fills `head`.
    if unsafe {
        libc::dlinfo(
            map,
            libc::RTLD_DI_SERINFOSIZE,
            (&mut head as *mut SearchInfo).cast(),
        )
    } != 0
    {
        return Vec::new();
    }
    let offset =
        std::mem::size_of::<SearchInfo>().next_multiple_of(std::mem::align_of::<SearchDirectory>());
    if head.size < offset + head.count as usize * std::mem::size_of::<SearchDirectory>() {
        return Vec::new();
    }
    // u64 words: aligned for the head, the entries and the strings.
    let mut buffer = vec![0u64; head.size.div_ceil(8)];
    let base = buffer.as_mut_ptr().cast::<u8>();
    // SAFETY: `buffer` holds `head.size` bytes, aligned for `SearchInfo`.
    unsafe {
        base.cast::<SearchInfo>().write(SearchInfo {
            size: head.size,
            count: head.count,
        })
    };
    // SAFETY: as above; SERINFO fills at most the size SERINFOSIZE gave, written in its head.
    if unsafe { libc::dlinfo(map, libc::RTLD_DI_SERINFO, base.cast()) } != 0 {
        return Vec::new();
    }
    (0..head.count as usize)
        .filter_map(|i| {
            // SAFETY: entry `i` of `count`, inside the buffer (checked against its size above).
            let entry = unsafe { &*base.add(offset).cast::<SearchDirectory>().add(i) };
            // SAFETY: glibc points each name at a C string inside the buffer.
            (!entry.name.is_null())
                .then(|| unsafe { CStr::from_ptr(entry.name) }.to_bytes().to_vec())
        })
        .collect()
}

/// Before a `Py_Initialize*`: a runtime started again after `Py_FinalizeEx` in a guarded process.
/// picklegate's state belongs to the first runtime and cannot be set up again in the second, so
/// `enforce` stops the process rather than let it run unguarded.
fn before_initialize() {
    if ACTIVE.load(Ordering::SeqCst) && FINALIZED.swap(false, Ordering::SeqCst) {
        stop("picklegate cannot guard a re-initialized interpreter (Py_Initialize after Py_FinalizeEx)");
    }
}

/// The real `Py_Initialize*` `name` (ends with NUL): libpython's, from the handle it was found
/// through or else the next object in the default scope. Stops the process if there is none.
///
/// # Safety
/// `F` is a function pointer type, the signature of the C function `name`.
unsafe fn real_initializer<F>(name: &[u8]) -> F {
    let handle = LIBPYTHON.load(Ordering::SeqCst);
    let scope = if handle.is_null() {
        libc::RTLD_NEXT
    } else {
        handle
    };
    // SAFETY: `scope` is RTLD_NEXT or a handle `dlopen` returned (libpython is never closed:
    // CPython cannot be unloaded); `F` is the signature of `name` (the caller's guarantee).
    if let Some(function) = unsafe { symbol_in::<F>(scope, name) } {
        return function;
    }
    // A libpython outside the default scope that no watched `dlopen` brought in (a process that
    // did not ask for picklegate, a plugin loaded RTLD_LOCAL that links it): look through every
    // loaded object.
    for object in loaded_objects() {
        let Some(real) = real_dlopen() else { break };
        // SAFETY: `object` is a C string, the name of a loaded object; RTLD_NOLOAD loads nothing.
        let handle = unsafe { real(object.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            continue;
        }
        // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
        let found = unsafe { symbol_in::<*mut c_void>(handle, name) };
        // SAFETY: balances the reference RTLD_NOLOAD took; the object stays loaded.
        unsafe { libc::dlclose(handle) };
        if let Some(address) = found.filter(|&address| !is_own(address)) {
            // SAFETY: the address of the function `name`, of type `F` (the caller's guarantee).
            return unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) };
        }
    }
    let name = String::from_utf8_lossy(&name[..name.len() - 1]);
    eprintln!("picklegate preload: cannot find the real {name}; stopping");
    // SAFETY: as in `stop`.
    unsafe { libc::_exit(EX_CONFIG) }
}

/// The names of the loaded objects (`dl_iterate_phdr`), the program's own (empty) left out.
fn loaded_objects() -> Vec<CString> {
    extern "C" fn collect(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the Vec `loaded_objects` passes, alive during the iteration.
        let names = unsafe { &mut *data.cast::<Vec<CString>>() };
        // SAFETY: glibc passes a valid `dl_phdr_info` for the call.
        let name = unsafe { (*info).dlpi_name };
        if !name.is_null() {
            // SAFETY: a non-null `dlpi_name` is a C string.
            let name = unsafe { CStr::from_ptr(name) };
            if !name.is_empty() {
                names.push(name.to_owned());
            }
        }
        0
    }
    let mut names: Vec<CString> = Vec::new();
    // SAFETY: `collect` has the callback's signature and uses `names` only during the call.
    unsafe { libc::dl_iterate_phdr(Some(collect), (&mut names as *mut Vec<CString>).cast()) };
    names
}

/// True when `address` is in this library.
fn is_own(address: *mut c_void) -> bool {
    // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
    let (mut theirs, mut own): (libc::Dl_info, libc::Dl_info) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: dladdr only describes the addresses into the structures.
    unsafe {
        libc::dladdr(address, &mut theirs) != 0
            && libc::dladdr(constructor as *const c_void, &mut own) != 0
            && theirs.dli_fbase == own.dli_fbase
    }
}

/// `Py_Initialize`, after `before_initialize`.
///
/// # Safety
/// As CPython's.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn Py_Initialize() {
    before_initialize();
    // SAFETY: `Initialize` is the signature of `Py_Initialize`; called as the caller called us.
    unsafe { real_initializer::<Initialize>(b"Py_Initialize\0")() }
}

/// `Py_InitializeEx`, after `before_initialize`.
///
/// # Safety
/// As CPython's.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn Py_InitializeEx(install_signal_handlers: c_int) {
    before_initialize();
    // SAFETY: `InitializeEx` is the signature of `Py_InitializeEx`; the argument is the caller's.
    unsafe { real_initializer::<InitializeEx>(b"Py_InitializeEx\0")(install_signal_handlers) }
}

/// `Py_InitializeFromConfig`, after `before_initialize`.
///
/// # Safety
/// As CPython's: `config` points to a `PyConfig`.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn Py_InitializeFromConfig(config: *const c_void) -> PyStatus {
    before_initialize();
    // SAFETY: `InitializeFromConfig` is the signature of `Py_InitializeFromConfig` (`PyStatus`
    // is CPython's layout); the argument is the caller's.
    unsafe { real_initializer::<InitializeFromConfig>(b"Py_InitializeFromConfig\0")(config) }
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

/// A function by name (`name` ends with NUL) in `scope`, or `None`.
///
/// # Safety
/// `F` is a function pointer type, the signature of the C function `name`; `scope` is a valid
/// dlsym handle (RTLD_DEFAULT, RTLD_NEXT, or a handle `dlopen` returned and not closed).
unsafe fn symbol_in<F>(scope: *mut c_void, name: &[u8]) -> Option<F> {
    let name = CStr::from_bytes_with_nul(name).ok()?;
    // SAFETY: `name` is a C string, `scope` valid (the caller's guarantee); dlsym only reads the
    // loaded objects' symbol tables.
    let address = unsafe { libc::dlsym(scope, name.as_ptr()) };
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

/// The runtime is being finalized, and a second one may start where the preload's `Py_Initialize*`
/// are not called (libpython linked into the program, or bound inside itself and found with
/// `dlsym`). The open-code hook outlives finalization (CPython keeps it for the process) and the
/// next runtime calls it for its first module read from a file (`encodings`, while it starts),
/// before any of its Python code runs: there the process stops. Only where stopping is the rule:
/// the lenient modes would need a working `open_code`.
fn arm_open_code_backstop() {
    if lenient() {
        return;
    }
    let Some(set_open_code_hook) = INTERPRETER.get().and_then(|i| i.set_open_code_hook) else {
        return;
    };
    // SAFETY: called from the hook during `Py_FinalizeEx`, after the interpreter state is cleared
    // and with the runtime marked uninitialized, so no audit event is raised and nothing reads the
    // open-code hook until a runtime starts again; `open_code_after_finalize` has the
    // `Py_OpenCodeHookFunction` signature. A hook already set (the program's own) stays: -1.
    let _ = unsafe { set_open_code_hook(open_code_after_finalize, std::ptr::null_mut()) };
}

/// The open-code hook of a runtime started after `Py_FinalizeEx`: stops the process.
///
/// # Safety
/// Called by CPython only, as `Py_OpenCodeHookFunction`.
unsafe extern "C" fn open_code_after_finalize(
    _path: *mut c_void,
    _user_data: *mut c_void,
) -> *mut c_void {
    stop("picklegate cannot guard a re-initialized interpreter (its first module read after Py_FinalizeEx)");
    // Only if the mode turned lenient since: no file, so the import fails.
    std::ptr::null_mut()
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
    if event == HOOKS_CLEARED {
        FINALIZED.store(true, Ordering::SeqCst);
        arm_open_code_backstop();
        return 0;
    }
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
