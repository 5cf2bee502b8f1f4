//! The LD_PRELOAD library (libc only; Python functions found with dlsym): in CPython it registers an
//! audit hook before start-up, then at the first event after start-up loads picklegate from beside it.
//! Listed in /etc/ld.so.preload with a root-owned /etc/picklegate/policy.toml, it guards every CPython
//! on the host whatever its flags and environment. It also watches `dlsym` and `Py_Initialize*` (a
//! libpython loaded later, however; a runtime started again after `Py_FinalizeEx`).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
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
/// `Py_BytesMain`, `Py_FrozenMain` (`char **argv`) and `Py_Main` (`wchar_t **argv`): the arguments
/// are only passed on.
type RunMain = unsafe extern "C" fn(c_int, *mut *mut c_void) -> c_int;
/// `dlopen`.
type Dlopen = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;

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
    // The trampolines' targets, found now (and lazily if something calls them earlier).
    for which in [DLOPEN, DLMOPEN, DLSYM] {
        real_dl_function(which);
    }
    let host = Path::new(HOST_POLICY).symlink_metadata().is_ok();
    if !host && !configured() {
        return;
    }
    HOST.store(host, Ordering::SeqCst);
    ACTIVE.store(true, Ordering::SeqCst);
    looking(|| {
        // SAFETY: RTLD_DEFAULT is a valid scope for dlsym.
        unsafe { arm(libc::RTLD_DEFAULT) };
    });
}

/// Set by the constructor when picklegate is asked for (host policy or environment): only then do
/// `dlsym` and `Py_Initialize*` look for a libpython before forwarding to the real functions.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// One thread at a time looks for CPython (two threads must not register two hooks); a thread that
/// finds another looking goes on (that one sees what was loaded).
static LOOKING: Mutex<()> = Mutex::new(());
thread_local! {
    /// Set while this thread looks: the `dlsym` calls of the look itself must not look again.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}
/// The link maps of the libpythons armed (at most one: a second one stops `enforce`, A2).
static ARMED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// The loaded objects already looked at (name and load address: an address alone is reused by the
/// next object mapped after one is unloaded, red team 7 P2), and glibc's load counter at the last look.
static SEEN: Mutex<Vec<(CString, usize)>> = Mutex::new(Vec::new());
static LAST_ADDS: AtomicU64 = AtomicU64::new(u64::MAX);
/// A second libpython was reported (lenient modes warn once).
static SECOND_REPORTED: AtomicBool = AtomicBool::new(false);
/// Set when a runtime this library guarded is finalized (`cpython._PySys_ClearAuditHooks`): its
/// hooks are gone, so a runtime started again would run unguarded.
static FINALIZED: AtomicBool = AtomicBool::new(false);
const HOOKS_CLEARED: &[u8] = b"cpython._PySys_ClearAuditHooks";

/// Runs `look` with LOOKING held and this thread marked as looking; nothing if it already is, or
/// if another thread is looking (never wait: this thread may hold the loader's lock, inside a
/// constructor that calls `dlsym`, which the other thread's look may be waiting for).
fn looking(look: impl FnOnce()) {
    let Ok(false) = INSIDE.try_with(|inside| inside.replace(true)) else {
        return;
    };
    let guard = match LOOKING.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if guard.is_some() {
        look();
    }
    drop(guard);
    let _ = INSIDE.try_with(|inside| inside.set(false));
}

/// The link map of the object defining `address` (glibc: a handle), or null.
fn object_of(address: *const c_void) -> *mut c_void {
    // SAFETY: `Dl_info` is pointers and integers, for which all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut map: *mut c_void = std::ptr::null_mut();
    // SAFETY: dladdr1 only describes the address into `info` and `map`.
    if unsafe { libc::dladdr1(address, &mut info, &mut map, RTLD_DL_LINKMAP) } == 0 {
        return std::ptr::null_mut();
    }
    map
}

/// Looks for CPython in `scope` (RTLD_DEFAULT, or a handle of a loaded object) and, when it is
/// there, registers the hook before the runtime starts. True when CPython was found.
///
/// # Safety
/// `scope` is RTLD_DEFAULT or a handle returned by `dlopen` and not closed; LOOKING is held.
unsafe fn arm(scope: *mut c_void) -> bool {
    // SAFETY: `AddAuditHook` is the signature of `PySys_AddAuditHook` (see its declaration);
    // `scope` is valid (the caller's guarantee).
    let add_audit_hook = unsafe { symbol_in::<AddAuditHook>(scope, b"PySys_AddAuditHook\0") };
    // SAFETY: `IsInitialized` is the signature of `Py_IsInitialized`.
    let is_initialized = unsafe { symbol_in::<IsInitialized>(scope, b"Py_IsInitialized\0") };
    let Some(add_audit_hook) = add_audit_hook else {
        if is_initialized.is_some() {
            stop("this CPython predates audit hooks (3.8); picklegate needs CPython 3.9 or later");
        }
        return false; // not CPython: stay invisible
    };
    let libpython = object_of(add_audit_hook as *const c_void) as usize;
    {
        let mut armed = ARMED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if armed.contains(&libpython) {
            return true;
        }
        if !armed.is_empty() {
            // A2: picklegate's state lives in the first runtime; a second libpython's runtime
            // would run without it.
            if !SECOND_REPORTED.swap(true, Ordering::SeqCst) {
                stop("a second libpython was loaded after the first one was guarded; picklegate guards one CPython per process");
            }
            return true;
        }
        armed.push(libpython);
    }
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
        // A libpython loaded later that something already started: its start-up ran without
        // the hook.
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

/// Before the runtime can start (the `dlsym` that fetches `Py_Initialize*`, or the preload's own
/// `Py_Initialize*`), in a process that asked for picklegate: a libpython loaded since the last
/// look, however it was loaded (libc's `dlopen` pointer, RTLD_LOCAL, `dlmopen`), is armed as one
/// there at start-up; a second one stops `enforce`. `handle` is the `dlsym` handle (null
/// otherwise): a libpython in a namespace of its own (`dlmopen`) is reached through it.
fn look_for_new_cpython(handle: *mut c_void) {
    if !ACTIVE.load(Ordering::SeqCst) {
        return;
    }
    looking(|| {
        if !handle.is_null() && handle != libc::RTLD_NEXT {
            // SAFETY: the program passes `handle` to `dlsym`, which takes a handle `dlopen` or
            // `dlmopen` returned and not closed; asked for as a plain address.
            let cpython =
                unsafe { symbol_in::<*mut c_void>(handle, b"PySys_AddAuditHook\0") }.is_some();
            if cpython {
                // SAFETY: as above; arm looks up CPython's functions in that scope.
                unsafe { arm(handle) };
            }
        }
        let adds = load_counter();
        if adds.is_some() && adds == Some(LAST_ADDS.load(Ordering::SeqCst)) {
            return; // nothing loaded since the last look
        }
        let mut fresh = Vec::new();
        {
            let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for object in loaded_objects() {
                if !seen.contains(&object) {
                    fresh.push(object.0.clone());
                    seen.push(object);
                }
            }
        }
        for name in fresh {
            let Some(handle) = loaded_handle(&name) else {
                continue;
            };
            // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
            let defines = unsafe { symbol_in::<*mut c_void>(handle, b"PySys_AddAuditHook\0") }
                .is_some_and(|address| object_of(address) == handle);
            // SAFETY: `handle` is a loaded libpython (the definition is its own) and not closed.
            if !defines || !unsafe { arm(handle) } {
                // SAFETY: balances the reference RTLD_NOLOAD took (an armed libpython keeps it).
                unsafe { libc::dlclose(handle) };
            }
        }
        LAST_ADDS.store(adds.unwrap_or(u64::MAX), Ordering::SeqCst);
        // The look-ups that found nothing left a dlerror message the caller did not cause.
        // SAFETY: dlerror only reads and clears this thread's message.
        unsafe { libc::dlerror() };
    });
}

/// glibc's count of objects loaded so far (`dlpi_adds`), or None where it is not given.
fn load_counter() -> Option<u64> {
    extern "C" fn first(info: *mut libc::dl_phdr_info, size: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the Option `load_counter` passes, alive during the iteration.
        let counter = unsafe { &mut *data.cast::<Option<u64>>() };
        let wanted = std::mem::offset_of!(libc::dl_phdr_info, dlpi_adds) + 8;
        if size >= wanted {
            // SAFETY: glibc passes a valid `dl_phdr_info` of `size` bytes, which hold `dlpi_adds`.
            *counter = Some(unsafe { (*info).dlpi_adds });
        }
        1 // the counter is the same in every entry: stop at the first
    }
    let mut counter: Option<u64> = None;
    // SAFETY: `first` has the callback's signature and uses `counter` only during the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut counter as *mut Option<u64>).cast()) };
    counter
}

/// A handle (a reference) to the loaded object `name`, loading nothing.
fn loaded_handle(name: &CStr) -> Option<*mut c_void> {
    let real = real_dl_function(DLOPEN);
    if real == 0 {
        return None;
    }
    // SAFETY: `real` is libc's `dlopen`, whose signature `Dlopen` is.
    let real = unsafe { std::mem::transmute::<usize, Dlopen>(real) };
    // SAFETY: `name` is a C string; RTLD_NOLOAD only looks among loaded objects.
    let handle = unsafe { real(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    (!handle.is_null()).then_some(handle)
}

// `dlopen`, `dlmopen` and `dlsym` are exact tail calls into libc's (glibc takes the caller from
// the return address: its search path, `$ORIGIN`, RTLD_NEXT stay the program's). Each saves the
// argument registers, asks `trampoline_target` for libc's function (for `dlsym`, after looking
// for a new libpython), restores them and jumps, the caller's return address left in place.
// `Py_Initialize*` and `Py_*Main` are trampolines too (red team 5 E7): `trampoline_target` picks
// the preload's wrapper when the definition the call reaches is a libpython's, else that
// definition itself (a namesake with any signature: a program that is not Python keeps its call).
// Only on x86_64 and aarch64 glibc; elsewhere libc's are not replaced and the wrappers are
// exported under CPython's names themselves.
const DLOPEN: usize = 0;
const DLMOPEN: usize = 1;
const DLSYM: usize = 2;
const DL_NAMES: [&[u8]; 3] = [b"dlopen\0", b"dlmopen\0", b"dlsym\0"];
/// The symbol versions of libc's functions, newest first (glibc 2.34 moved them into libc).
#[cfg(target_arch = "x86_64")]
const DL_VERSIONS: [[&[u8]; 2]; 3] = [
    [b"GLIBC_2.34\0", b"GLIBC_2.2.5\0"],
    [b"GLIBC_2.34\0", b"GLIBC_2.3.4\0"],
    [b"GLIBC_2.34\0", b"GLIBC_2.2.5\0"],
];
#[cfg(not(target_arch = "x86_64"))]
const DL_VERSIONS: [[&[u8]; 2]; 3] = [
    [b"GLIBC_2.34\0", b"GLIBC_2.17\0"],
    [b"GLIBC_2.34\0", b"GLIBC_2.17\0"],
    [b"GLIBC_2.34\0", b"GLIBC_2.17\0"],
];
static DL_REAL: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

/// The function `which` (DLOPEN, DLMOPEN, DLSYM) that follows this library's: the next definition
/// after it (a dlopen/dlsym interposer preloaded after this one, else libc's), asked for with libc's
/// `dlsym` (found with `dlvsym`: this library defines `dlsym`) so RTLD_NEXT is taken from here;
/// libc's own by version if there is no such definition. Found once; 0 if libc has none.
fn real_dl_function(which: usize) -> usize {
    let known = DL_REAL[which].load(Ordering::Acquire);
    if known != 0 {
        return known;
    }
    let libc = libc_dl_function(which);
    let libc_dlsym = if which == DLSYM {
        libc
    } else {
        libc_dl_function(DLSYM)
    };
    let mut address = libc;
    if libc_dlsym != 0 {
        // SAFETY: `libc_dlsym` is libc's `dlsym`; called from this library, RTLD_NEXT asks for the
        // definition after it; the name is NUL-terminated.
        let dlsym = unsafe {
            std::mem::transmute::<
                usize,
                unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void,
            >(libc_dlsym)
        };
        // SAFETY: as above.
        let next = unsafe { dlsym(libc::RTLD_NEXT, DL_NAMES[which].as_ptr().cast()) } as usize;
        if next != 0 && !is_own(next as *mut c_void) {
            address = next;
        }
    }
    if address != 0 {
        DL_REAL[which].store(address, Ordering::Release);
    }
    address
}

/// libc's function `which`, found with `dlvsym` by version (not replaced here); 0 if none.
fn libc_dl_function(which: usize) -> usize {
    for version in DL_VERSIONS[which] {
        // SAFETY: NUL-terminated name and version; RTLD_NEXT asks for the definition after
        // this library's, and `dlvsym` is libc's own (this library does not define it).
        let address = unsafe {
            libc::dlvsym(
                libc::RTLD_NEXT,
                DL_NAMES[which].as_ptr().cast(),
                version.as_ptr().cast(),
            )
        };
        if !address.is_null() {
            return address as usize;
        }
    }
    0
}

/// What a trampoline jumps to: for a `Py_Initialize*`/`Py_*Main`, `starter_target`; else libc's
/// function `which`, or, if libc has none, one that fails. `first` and `second` are the call's
/// first two arguments (for `dlsym`: handle and name), `return_address` the caller's.
extern "C" fn trampoline_target(
    which: usize,
    first: usize,
    second: usize,
    return_address: usize,
) -> usize {
    if which >= PY_INITIALIZE {
        return starter_target(which, return_address);
    }
    if which == DLSYM {
        note_initializer_fetch(
            first as *mut c_void,
            second as *const c_char,
            return_address,
        );
        look_for_new_cpython(first as *mut c_void);
    }
    match real_dl_function(which) {
        0 => missing as *const () as usize,
        real => real,
    }
}

/// Stands in for a libc function that cannot be found: fails (null), as a failed load does.
extern "C" fn missing() -> *mut c_void {
    std::ptr::null_mut()
}

/// Defines the tail-calling function `$name`, which jumps where `trampoline_target` says for
/// function number `$which` (on the architectures and libc the trampolines are written for;
/// elsewhere, nothing). Every argument register is saved and restored around that call (the
/// integer ones, the vector ones, the x86_64 vector count `al`, the aarch64 result address `x8`),
/// and stack arguments are not touched, so the function jumped to runs as if called directly,
/// whatever its signature.
macro_rules! trampoline {
    ($(#[$attribute:meta])* $name:ident, $which:expr) => {
        $(#[$attribute])*
        ///
        /// # Safety
        /// As the function of the same name it forwards to.
        #[cfg(all(
            target_env = "gnu",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        #[no_mangle]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name() {
            // SAFETY: the argument registers are saved and restored around a call made with the
            // stack aligned as the ABI wants; the jump (through r11, which no argument uses)
            // leaves the stack and the return address exactly as the caller left them.
            #[cfg(target_arch = "x86_64")]
            std::arch::naked_asm!(
                // Entry: rsp = 8 mod 16; seven pushes and 128 bytes align it for the call.
                "push rdi",
                "push rsi",
                "push rdx",
                "push rcx",
                "push r8",
                "push r9",
                "push rax",
                "sub rsp, 128",
                "movaps [rsp], xmm0",
                "movaps [rsp + 16], xmm1",
                "movaps [rsp + 32], xmm2",
                "movaps [rsp + 48], xmm3",
                "movaps [rsp + 64], xmm4",
                "movaps [rsp + 80], xmm5",
                "movaps [rsp + 96], xmm6",
                "movaps [rsp + 112], xmm7",
                "mov rcx, [rsp + 184]",
                "mov rdx, rsi",
                "mov rsi, rdi",
                "mov edi, {which}",
                "call {target}",
                "mov r11, rax",
                "movaps xmm0, [rsp]",
                "movaps xmm1, [rsp + 16]",
                "movaps xmm2, [rsp + 32]",
                "movaps xmm3, [rsp + 48]",
                "movaps xmm4, [rsp + 64]",
                "movaps xmm5, [rsp + 80]",
                "movaps xmm6, [rsp + 96]",
                "movaps xmm7, [rsp + 112]",
                "add rsp, 128",
                "pop rax",
                "pop r9",
                "pop r8",
                "pop rcx",
                "pop rdx",
                "pop rsi",
                "pop rdi",
                "jmp r11",
                which = const $which,
                target = sym trampoline_target,
            );
            // SAFETY: as above (x0-x8, q0-q7 and the frame record saved on a 16-byte aligned
            // stack; x30 restored before the jump through x16, the intra-procedure scratch
            // register).
            #[cfg(target_arch = "aarch64")]
            std::arch::naked_asm!(
                "stp x29, x30, [sp, #-224]!",
                "mov x29, sp",
                "stp x0, x1, [sp, #16]",
                "stp x2, x3, [sp, #32]",
                "stp x4, x5, [sp, #48]",
                "stp x6, x7, [sp, #64]",
                "str x8, [sp, #80]",
                "stp q0, q1, [sp, #96]",
                "stp q2, q3, [sp, #128]",
                "stp q4, q5, [sp, #160]",
                "stp q6, q7, [sp, #192]",
                "mov x3, x30",
                "mov x2, x1",
                "mov x1, x0",
                "mov x0, #{which}",
                "bl {target}",
                "mov x16, x0",
                "ldp q6, q7, [sp, #192]",
                "ldp q4, q5, [sp, #160]",
                "ldp q2, q3, [sp, #128]",
                "ldp q0, q1, [sp, #96]",
                "ldr x8, [sp, #80]",
                "ldp x6, x7, [sp, #64]",
                "ldp x4, x5, [sp, #48]",
                "ldp x2, x3, [sp, #32]",
                "ldp x0, x1, [sp, #16]",
                "ldp x29, x30, [sp], #224",
                "br x16",
                which = const $which,
                target = sym trampoline_target,
            );
        }
    };
}

trampoline!(
    /// `dlopen(filename, flags)`: libc's, called as the program called it.
    dlopen,
    DLOPEN
);
trampoline!(
    /// `dlmopen(namespace, filename, flags)`: libc's, called as the program called it.
    dlmopen,
    DLMOPEN
);
trampoline!(
    /// `dlsym(handle, name)`: first a look for a libpython loaded since the last one (hosts that
    /// load libpython get `Py_Initialize*` through `dlsym`), then libc's, as the program called it.
    dlsym,
    DLSYM
);

/// glibc's `dladdr1` request for the link map (dlfcn.h; not in the libc crate).
const RTLD_DL_LINKMAP: c_int = 2;

/// The link map (glibc: the handle) of the object whose code called into this library: the
/// first frame up the stack outside it.
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

/// Before a `Py_Initialize*`: a libpython loaded since the last look is armed (a plugin linked to
/// libpython calls these through its PLT), and a runtime started again after `Py_FinalizeEx` in a
/// guarded process stops `enforce`: picklegate's state belongs to the first runtime and cannot be
/// set up again in the second.
fn before_initialize() {
    look_for_new_cpython(std::ptr::null_mut());
    if ACTIVE.load(Ordering::SeqCst) && FINALIZED.swap(false, Ordering::SeqCst) {
        stop("picklegate cannot guard a re-initialized interpreter (Py_Initialize after Py_FinalizeEx)");
    }
}

/// The definitions of a `Py_Initialize*`/`Py_*Main` that a call from the object `caller` can mean,
/// best first: the one in the caller's own scope when it is a libpython's (a libpython calling
/// itself through its PLT reaches its own, never another libpython's; a namesake there yields to
/// the global scope's, as the loader orders them), else (the program called, or a libpython
/// tail-called through its PLT) the one in the object the program fetched its `Py_Initialize*`
/// from with `dlsym`, else the one it reaches without this library (the next in the default
/// scope), else every loaded object's own.
enum Definitions {
    InCallerScope(*mut c_void),
    /// With the next one, if there is one: it may be another libpython.
    Fetched(*mut c_void, Option<*mut c_void>),
    Next(*mut c_void),
    Loaded(Vec<*mut c_void>),
}

/// The definitions of `name` (ends with NUL) that a call from `caller` can mean (see `Definitions`).
fn definitions(name: &[u8], caller: Option<*mut c_void>) -> Definitions {
    let not_own = |address: &*mut c_void| !is_own(*address);
    // SAFETY: a null name asks for the main program, loading nothing new.
    let main = unsafe { libc::dlopen(std::ptr::null(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    let caller = caller.filter(|&map| map != main);
    if let Some(handle) = caller.and_then(name_of).and_then(|n| loaded_handle(&n)) {
        // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
        let found = unsafe { symbol_in::<*mut c_void>(handle, name) }.filter(not_own);
        // SAFETY: balances the reference RTLD_NOLOAD took; the caller stays loaded.
        unsafe { libc::dlclose(handle) };
        if let Some(address) = found {
            if in_libpython(address) {
                return Definitions::InCallerScope(address);
            }
            // A namesake: the loader searches the global scope before the caller's own (a library
            // earlier in the program's order overrides it, red team 7 P16).
            // SAFETY: RTLD_NEXT is a valid scope; asked for as a plain address.
            let next = unsafe { symbol_in::<*mut c_void>(libc::RTLD_NEXT, name) }.filter(not_own);
            return Definitions::InCallerScope(next.unwrap_or(address));
        }
    }
    let fetched = INITIALIZER_FETCHED_FROM
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let mut from_fetch = None;
    if let Some(handle) = fetched.and_then(|object| loaded_handle(&object)) {
        // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
        from_fetch = unsafe { symbol_in::<*mut c_void>(handle, name) }
            .filter(|&address| object_of(address) == handle);
        // SAFETY: balances the reference RTLD_NOLOAD took; the object stays loaded.
        unsafe { libc::dlclose(handle) };
    }
    // SAFETY: RTLD_NEXT is a valid scope; asked for as a plain address.
    let next = unsafe { symbol_in::<*mut c_void>(libc::RTLD_NEXT, name) }.filter(not_own);
    match (from_fetch, next) {
        (Some(fetched), next) => return Definitions::Fetched(fetched, next),
        (None, Some(next)) => return Definitions::Next(next),
        (None, None) => {}
    }
    let mut loaded = Vec::new();
    for (object, _) in loaded_objects() {
        let Some(handle) = loaded_handle(&object) else {
            continue;
        };
        // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
        let found = unsafe { symbol_in::<*mut c_void>(handle, name) };
        if let Some(address) = found.filter(|&a| object_of(a) == handle) {
            loaded.push(address);
        }
        // SAFETY: balances the reference RTLD_NOLOAD took; the object stays loaded.
        unsafe { libc::dlclose(handle) };
    }
    Definitions::Loaded(loaded)
}

impl Definitions {
    /// The one definition meant, when no definition that could be meant is a libpython's (a
    /// namesake, of a signature this library does not know); None otherwise, or when there is no
    /// single one: then the wrapper decides, as for a libpython.
    fn namesake(&self) -> Option<*mut c_void> {
        let (meant, other) = match self {
            Definitions::InCallerScope(address) | Definitions::Next(address) => (*address, None),
            Definitions::Fetched(fetched, next) => (*fetched, *next),
            Definitions::Loaded(loaded) => match loaded[..] {
                [address] => (address, None),
                _ => return None,
            },
        };
        (!in_libpython(meant) && !other.is_some_and(in_libpython)).then_some(meant)
    }
}

/// True when the object that defines `address` is a CPython, or when this cannot tell: it defines
/// `Py_IsInitialized` or `PySys_AddAuditHook` itself (every CPython from 3.8 does; `arm` knows
/// CPython by the same two).
fn in_libpython(address: *mut c_void) -> bool {
    let map = object_of(address);
    let Some(handle) = (!map.is_null())
        .then(|| name_of(map))
        .flatten()
        .and_then(|name| loaded_handle(&name))
    else {
        return true;
    };
    let defines = |name: &[u8]| {
        // SAFETY: `handle` was just returned by `dlopen`; asked for as a plain address.
        unsafe { symbol_in::<*mut c_void>(handle, name) }
            .is_some_and(|address| object_of(address) == handle)
    };
    let cpython =
        handle != map || defines(b"Py_IsInitialized\0") || defines(b"PySys_AddAuditHook\0");
    // SAFETY: balances the reference RTLD_NOLOAD took; the object stays loaded.
    unsafe { libc::dlclose(handle) };
    cpython
}

/// The real `Py_Initialize*` `name` (ends with NUL) for the object that called, as `definitions`
/// ranks them. Stops the process when there is none, or several; under `enforce`, also when the
/// fetched one and the next one differ (it does not guess).
///
/// # Safety
/// `F` is a function pointer type, the signature of the C function `name`.
unsafe fn real_initializer<F>(name: &[u8]) -> F {
    let address = match definitions(name, calling_object()) {
        Definitions::InCallerScope(address) | Definitions::Next(address) => address,
        Definitions::Fetched(fetched, next) => {
            if next.is_some_and(|next| next != fetched)
                && ACTIVE.load(Ordering::SeqCst)
                && !lenient()
            {
                // Two libpythons could be meant (the one fetched with `dlsym`, the one the
                // program is linked to): `enforce` does not guess.
                stop("two libpythons could be the one starting here; picklegate does not guess which");
            }
            fetched
        }
        Definitions::Loaded(loaded) => {
            let name = String::from_utf8_lossy(&name[..name.len() - 1]);
            match loaded[..] {
                [address] => address,
                [] => {
                    eprintln!("picklegate preload: cannot find the real {name}; stopping");
                    // SAFETY: as in `stop`.
                    unsafe { libc::_exit(EX_CONFIG) }
                }
                _ => {
                    eprintln!("picklegate preload: several libpythons define {name} and none is in its caller's scope; stopping rather than start the wrong one");
                    // SAFETY: as in `stop`.
                    unsafe { libc::_exit(EX_CONFIG) }
                }
            }
        }
    };
    // SAFETY: the address of the function `name`, of type `F` (the caller's guarantee).
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) }
}

/// The object whose `Py_Initialize*` the program fetched last with `dlsym` on a handle: a
/// libpython's `Py_Initialize` may reach the preload's `Py_InitializeEx` by a tail call through
/// its PLT, which leaves no frame of it on the stack, only the program's.
static INITIALIZER_FETCHED_FROM: Mutex<Option<CString>> = Mutex::new(None);

/// Notes, for `real_initializer`, which object a `dlsym(handle, "Py_Initialize*")` called from
/// `return_address` finds: the program's fetches only, not this library's own look-ups.
fn note_initializer_fetch(handle: *mut c_void, name: *const c_char, return_address: usize) {
    if name.is_null() || handle.is_null() || handle == libc::RTLD_NEXT {
        return;
    }
    // SAFETY: `dlsym`'s name is a C string (its caller's guarantee).
    if !unsafe { CStr::from_ptr(name) }
        .to_bytes()
        .starts_with(b"Py_Initialize")
        || is_own(return_address.wrapping_sub(1) as *mut c_void)
    {
        return;
    }
    let real = real_dl_function(DLSYM);
    if real == 0 {
        return;
    }
    // SAFETY: `real` is libc's `dlsym`; `handle` and `name` are the program's own arguments to
    // it, which it is about to pass again; the look-up changes nothing but dlerror's state.
    let real = unsafe {
        std::mem::transmute::<usize, unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void>(
            real,
        )
    };
    // SAFETY: as above.
    let address = unsafe { real(handle, name) };
    let object = (!address.is_null() && !is_own(address))
        .then(|| object_of(address))
        .filter(|map| !map.is_null())
        .and_then(name_of);
    if object.is_some() {
        *INITIALIZER_FETCHED_FROM
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = object;
    }
}

/// The file name glibc knows the object `map` by (its `l_name`).
fn name_of(map: *mut c_void) -> Option<CString> {
    /// The public head of glibc's `struct link_map` (link.h).
    #[repr(C)]
    struct LinkMap {
        addr: usize,
        name: *const c_char,
    }
    // SAFETY: `map` is a loaded object's link map (from dladdr1), whose head is `LinkMap`.
    let name = unsafe { (*map.cast::<LinkMap>()).name };
    // SAFETY: a non-null `l_name` is a C string owned by the loader while the object is loaded.
    (!name.is_null())
        .then(|| unsafe { CStr::from_ptr(name) }.to_owned())
        .filter(|name| !name.is_empty())
}

/// The names and link maps of the loaded objects (`dl_iterate_phdr`), the program (no name) left out.
fn loaded_objects() -> Vec<(CString, usize)> {
    extern "C" fn collect(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the Vec `loaded_objects` passes, alive during the iteration.
        let objects = unsafe { &mut *data.cast::<Vec<(CString, usize)>>() };
        // SAFETY: glibc passes a valid `dl_phdr_info` for the call.
        let (name, base) = unsafe { ((*info).dlpi_name, (*info).dlpi_addr) };
        if !name.is_null() {
            // SAFETY: a non-null `dlpi_name` is a C string.
            let name = unsafe { CStr::from_ptr(name) };
            if !name.is_empty() {
                objects.push((name.to_owned(), base as usize));
            }
        }
        0
    }
    let mut objects: Vec<(CString, usize)> = Vec::new();
    // SAFETY: `collect` has the callback's signature and uses `objects` only during the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect),
            (&mut objects as *mut Vec<(CString, usize)>).cast(),
        )
    };
    objects
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

// The preload's `Py_Initialize*` and `Py_*Main`: trampolines (see `trampoline!`) to `starter_target`,
// which jumps to the wrapper below of the same name for a libpython's, and to the definition itself
// for anything else.
const PY_INITIALIZE: usize = 3;
const PY_INITIALIZE_EX: usize = 4;
const PY_INITIALIZE_FROM_CONFIG: usize = 5;
const PY_BYTES_MAIN: usize = 6;
const PY_MAIN: usize = 7;
const PY_FROZEN_MAIN: usize = 8;
/// Their names, from PY_INITIALIZE on.
const STARTER_NAMES: [&[u8]; 6] = [
    b"Py_Initialize\0",
    b"Py_InitializeEx\0",
    b"Py_InitializeFromConfig\0",
    b"Py_BytesMain\0",
    b"Py_Main\0",
    b"Py_FrozenMain\0",
];

trampoline!(
    /// `Py_Initialize()`: `initialize` for a libpython's, else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_Initialize,
    PY_INITIALIZE
);
trampoline!(
    /// `Py_InitializeEx(int)`: `initialize_ex` for a libpython's, else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_InitializeEx,
    PY_INITIALIZE_EX
);
trampoline!(
    /// `Py_InitializeFromConfig(const PyConfig *)`: `initialize_from_config` for a libpython's,
    /// else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_InitializeFromConfig,
    PY_INITIALIZE_FROM_CONFIG
);
trampoline!(
    /// `Py_BytesMain(int, char **)`: `bytes_main` for a libpython's, else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_BytesMain,
    PY_BYTES_MAIN
);
trampoline!(
    /// `Py_Main(int, wchar_t **)`: `py_main` for a libpython's, else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_Main,
    PY_MAIN
);
trampoline!(
    /// `Py_FrozenMain(int, char **)`: `frozen_main` for a libpython's, else the namesake, untouched.
    #[allow(non_snake_case)]
    Py_FrozenMain,
    PY_FROZEN_MAIN
);

/// Where the preload's `Py_Initialize*`/`Py_*Main` number `which`, called from `return_address`,
/// goes: the wrapper of that name when a libpython's definition could be the one meant (or this
/// cannot tell), as `real_initializer` ranks them; else, after `before_initialize` (a shim that is
/// not CPython may still start one), the one definition the call reaches: a namesake, whose
/// signature may differ from CPython's, called with the caller's arguments untouched (E7).
fn starter_target(which: usize, return_address: usize) -> usize {
    let name = STARTER_NAMES[which - PY_INITIALIZE];
    let caller = object_of(return_address.wrapping_sub(1) as *const c_void);
    let namesake = definitions(name, (!caller.is_null()).then_some(caller)).namesake();
    if namesake.is_some() {
        before_initialize();
    }
    // The look-ups that found nothing left a dlerror message the caller did not cause.
    // SAFETY: dlerror only reads and clears this thread's message.
    unsafe { libc::dlerror() };
    if let Some(address) = namesake {
        return address as usize;
    }
    let wrapper = match which {
        PY_INITIALIZE => initialize as *const (),
        PY_INITIALIZE_EX => initialize_ex as *const (),
        PY_INITIALIZE_FROM_CONFIG => initialize_from_config as *const (),
        PY_BYTES_MAIN => bytes_main as *const (),
        PY_MAIN => py_main as *const (),
        _ => frozen_main as *const (),
    };
    wrapper as usize
}

/// `Py_Initialize`, after `before_initialize`.
///
/// # Safety
/// As CPython's.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_Initialize"
)]
unsafe extern "C" fn initialize() {
    before_initialize();
    // SAFETY: `Initialize` is the signature of `Py_Initialize`; called as the caller called us.
    unsafe { real_initializer::<Initialize>(b"Py_Initialize\0")() }
}

/// `Py_InitializeEx`, after `before_initialize`.
///
/// # Safety
/// As CPython's.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_InitializeEx"
)]
unsafe extern "C" fn initialize_ex(install_signal_handlers: c_int) {
    before_initialize();
    // SAFETY: `InitializeEx` is the signature of `Py_InitializeEx`; the argument is the caller's.
    unsafe { real_initializer::<InitializeEx>(b"Py_InitializeEx\0")(install_signal_handlers) }
}

/// `Py_InitializeFromConfig`, after `before_initialize`.
///
/// # Safety
/// As CPython's: `config` points to a `PyConfig`.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_InitializeFromConfig"
)]
unsafe extern "C" fn initialize_from_config(config: *const c_void) -> PyStatus {
    before_initialize();
    // SAFETY: `InitializeFromConfig` is the signature of `Py_InitializeFromConfig` (`PyStatus`
    // is CPython's layout); the argument is the caller's.
    unsafe { real_initializer::<InitializeFromConfig>(b"Py_InitializeFromConfig\0")(config) }
}

/// `Py_BytesMain`, after `before_initialize`: a libpython whose calls are bound inside it (Debian's,
/// built with -fno-semantic-interposition) starts its runtime from here without reaching the
/// preload's `Py_InitializeFromConfig` (red team 4 C1/C2/C5; C17 for `Py_FrozenMain`).
///
/// # Safety
/// As CPython's.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_BytesMain"
)]
unsafe extern "C" fn bytes_main(argc: c_int, argv: *mut *mut c_void) -> c_int {
    before_initialize();
    // SAFETY: `RunMain` is the signature of `Py_BytesMain`; the arguments are the caller's.
    unsafe { real_initializer::<RunMain>(b"Py_BytesMain\0")(argc, argv) }
}

/// `Py_Main`, after `before_initialize` (as `Py_BytesMain`).
///
/// # Safety
/// As CPython's.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_Main"
)]
unsafe extern "C" fn py_main(argc: c_int, argv: *mut *mut c_void) -> c_int {
    before_initialize();
    // SAFETY: `RunMain` is the signature of `Py_Main`; the arguments are the caller's.
    unsafe { real_initializer::<RunMain>(b"Py_Main\0")(argc, argv) }
}

/// `Py_FrozenMain` (a program made by Tools/freeze), after `before_initialize` (as `Py_BytesMain`).
///
/// # Safety
/// As CPython's.
#[cfg_attr(
    not(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )),
    export_name = "Py_FrozenMain"
)]
unsafe extern "C" fn frozen_main(argc: c_int, argv: *mut *mut c_void) -> c_int {
    before_initialize();
    // SAFETY: `RunMain` is the signature of `Py_FrozenMain`; the arguments are the caller's.
    unsafe { real_initializer::<RunMain>(b"Py_FrozenMain\0")(argc, argv) }
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
/// before any of its Python code runs: there the process stops. When the program set its own
/// open-code hook (CPython keeps the first), the process stops here, at finalization. Only where
/// stopping is the rule: the lenient modes would need a working `open_code`.
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
    if unsafe { set_open_code_hook(open_code_after_finalize, std::ptr::null_mut()) } != 0 {
        // The program's own open-code hook stays, so nothing would stop a runtime started
        // again (through a `dlsym` pointer, which the preload's `Py_Initialize*` never see).
        stop("the program set its own open-code hook, so picklegate cannot stop a runtime started again after Py_FinalizeEx; stopping at finalization");
    }
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
