//! What a global can do when a pickle resolves and calls it: `code`, `data` or `unknown`, from one
//! reviewed table whose every entry says why and where the judgement comes from.
//!
//! Sources cited in the table:
//! - [picklescan]: mmaitre314/picklescan `src/picklescan/scanner.py`, `_unsafe_globals` / `_safe_globals`.
//! - [modelscan]: protectai/modelscan `modelscan/settings.py`, the `unsafe_globals` CRITICAL/HIGH lists.
//! - [fickling]: trailofbits/fickling `fickling/fickle.py`, `UNSAFE_IMPORTS` and its builtin checks.
//! - [torch-wo]: torch `torch/_weights_only_unpickler.py`, `_get_allowed_globals()` (what
//!   `torch.load(weights_only=True)` admits) and `_tensor_rebuild_functions()`.
//! - [numpy]: the reducers numpy's own `ndarray.__reduce__` / `dtype.__reduce__` write.
//! - [corpus]: a technique of this repository's hostile corpus (`pytests/corpus/payloads.py`).

use std::fmt;

/// What resolving and calling a global can do, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Risk {
    /// Runs code, touches processes, files or the network, or reaches objects by name at load
    /// time (attribute or item lookups, imports): never load it without reading its arguments.
    Code,
    /// Library classes and everything else: what they do depends on their own code.
    Unknown,
    /// Builds plain data only: containers, numbers, strings, arrays and tensors.
    Data,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Code => "code",
            Risk::Unknown => "unknown",
            Risk::Data => "data",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reviewed entry: `module.*` (the module and its submodules, any name) or `module.name`
/// where `*` in the name matches within the name only (`torch.*Storage`), its class, and why.
pub struct Rule {
    pub pattern: &'static str,
    pub risk: Risk,
    pub why: &'static str,
}

const fn code(pattern: &'static str, why: &'static str) -> Rule {
    Rule {
        pattern,
        risk: Risk::Code,
        why,
    }
}

const fn data(pattern: &'static str, why: &'static str) -> Rule {
    Rule {
        pattern,
        risk: Risk::Data,
        why,
    }
}

/// `code` entries are checked first: a global both lists match is `code`.
pub const RULES: &[Rule] = &[
    // --- processes and the operating system
    code("os.*", "os.system, os.popen, os.exec*, os.spawn*, file removal [picklescan, modelscan, corpus]"),
    code("posix.*", "os's implementation on Linux: posix.system [picklescan, corpus]"),
    code("nt.*", "os's implementation on Windows: nt.system [picklescan]"),
    code("subprocess.*", "runs commands: call, run, Popen, check_output, getoutput [picklescan, modelscan, corpus]"),
    code("_posixsubprocess.*", "fork_exec runs a command (CVE-2025-10157) [modelscan]"),
    code("pty.*", "pty.spawn runs a command [picklescan]"),
    code("commands.*", "Python 2 getoutput runs a command [picklescan]"),
    code("sys.*", "sys.modules reaches every loaded module [picklescan, corpus]"),
    code("gc.*", "gc.get_objects/get_referrers reach every live object"),
    code("signal.*", "installs handlers, sends signals"),
    code("_thread.*", "start_new_thread calls any function [modelscan]"),
    // --- evaluation, imports, attribute and item lookups
    code("builtins.eval", "evaluates a string [picklescan, fickling, corpus]"),
    code("builtins.exec", "executes a string or code object [picklescan, fickling, corpus]"),
    code("builtins.compile", "makes code objects from text [picklescan, corpus]"),
    code("builtins.getattr", "reaches any attribute of any object: getattr(module, 'system') [picklescan, fickling, corpus]"),
    code("builtins.setattr", "rewrites attributes of modules and classes [fickling]"),
    code("builtins.delattr", "removes attributes of modules and classes [fickling]"),
    code("builtins.__import__", "imports any module by name [fickling, corpus]"),
    code("builtins.open", "opens any file for reading or writing [picklescan]"),
    code("builtins.breakpoint", "starts the debugger [picklescan]"),
    code("builtins.input", "reads the terminal"),
    code("builtins.globals", "reaches the builtins module's namespace [fickling]"),
    code("builtins.locals", "reaches a namespace [fickling]"),
    code("builtins.vars", "reaches any object's namespace [fickling]"),
    code("builtins.apply", "Python 2 apply calls any function [picklescan]"),
    code("builtins.map", "calls a function over items: list(map(os.system, [...])) [corpus]"),
    code("builtins.filter", "calls a function over items, like map"),
    code("builtins.type", "makes classes with any attributes"),
    code("builtins.__build_class__", "runs a class body function"),
    code("builtins.iter", "iter(callable, sentinel) calls the callable until it returns the sentinel"),
    code("builtins.help", "starts pydoc's interactive help, whose pager runs a command"),
    code("builtins.super", "reaches a class's parents' methods"),
    code("builtins.memoryview", "views any object's raw memory"),
    code("importlib.*", "import_module imports any module [fickling, modelscan, corpus]"),
    code("pkgutil.*", "resolve_name('os:system') imports and reaches anything [corpus]"),
    code("runpy.*", "runs modules and code [picklescan, modelscan]"),
    code("code.*", "InteractiveInterpreter runs source [picklescan, corpus]"),
    code("codeop.*", "compiles source [modelscan]"),
    code("pydoc.*", "locate imports anything, pipepager runs a command [picklescan, corpus]"),
    code("timeit.*", "timeit runs a statement given as text [picklescan, corpus]"),
    code("cProfile.*", "run/runctx execute a statement [picklescan, corpus]"),
    code("profile.*", "Profile.run executes a statement [picklescan]"),
    code("pdb.*", "the debugger runs statements [picklescan]"),
    code("bdb.*", "the debugger base runs statements [picklescan]"),
    code("trace.*", "Trace.run executes a statement [picklescan]"),
    code("doctest.*", "debug_script runs source [picklescan]"),
    code("idlelib.*", "runcode/fetch_tip evaluate source [picklescan]"),
    code("lib2to3.*", "Grammar.loads unpickles, make_label evaluates [picklescan]"),
    code("operator.*", "attrgetter, itemgetter, methodcaller, getitem reach and call anything [picklescan, corpus]"),
    code("_operator.*", "operator's implementation module [picklescan]"),
    code("functools.partial", "binds a call for later: partial(os.system, cmd) [picklescan, corpus]"),
    code("functools.partialmethod", "binds a call like partial"),
    code("functools.reduce", "calls a function over items"),
    code("itertools.starmap", "calls a function over items, like map"),
    code("atexit.*", "register(os.system, cmd) runs a call when the process exits"),
    code("weakref.finalize", "runs a call when an object is collected"),
    code("copyreg.add_extension", "registers an extension code that later EXT opcodes resolve to any global"),
    code("copyreg.remove_extension", "rewrites the extension registry"),
    code("copyreg.clear_extension_cache", "rewrites the extension cache"),
    code("copyreg.pickle", "registers reducers for later pickling"),
    code("copyreg.constructor", "registers a constructor"),
    code("typing.get_type_hints", "evaluates string annotations"),
    code("imp.*", "load_source/load_module import code from any file (Python < 3.12)"),
    code("mmap.*", "maps files into memory"),
    code("sqlite3.*", "opens and creates database files"),
    code("types.FunctionType", "makes a function from a code object [corpus]"),
    code("types.CodeType", "makes a code object from bytes"),
    code("types.MethodType", "binds any function to any object"),
    code("marshal.*", "loads code objects [modelscan, corpus]"),
    code("ctypes.*", "calls C functions, reads and writes raw memory [picklescan, modelscan]"),
    code("_ctypes.*", "ctypes's implementation module"),
    code("inspect.*", "getattr_static and friends reach any attribute"),
    // --- loading other pickles (not scanned here)
    code("pickle.*", "pickle.loads runs a nested pickle this scan does not follow [picklescan, corpus]"),
    code("_pickle.*", "pickle's C module: loads runs a nested pickle [picklescan, corpus]"),
    code("shelve.*", "opens a pickle database [modelscan]"),
    code("dill.*", "dill rebuilds functions, code objects and modules [fickling]"),
    code("cloudpickle.*", "cloudpickle rebuilds functions and code objects by value"),
    code("joblib.load", "loads another joblib pickle, not scanned here"),
    code("joblib.numpy_pickle.load", "loads another joblib pickle, not scanned here"),
    code("numpy.load", "loads a file, with allow_pickle a pickle, not scanned here [picklescan TODO list]"),
    code("numpy.f2py.*", "getlincoef/_eval_length call eval on strings [picklescan]"),
    code("numpy.testing.*", "runstring executes source [picklescan]"),
    code("numpy.distutils.*", "runs build commands"),
    code("numpy.ctypeslib.*", "load_library loads any shared library [picklescan TODO list]"),
    code("pandas.read_pickle", "loads another pickle, not scanned here [picklescan TODO list]"),
    code("pandas.io.pickle.*", "read_pickle loads another pickle"),
    code("torch.load", "loads another checkpoint, not scanned here [picklescan]"),
    code("torch.storage._load_from_bytes", "torch.load of embedded bytes with weights_only=False: a nested pickle, not scanned here"),
    code("torch._C.*", "torch's C bindings: JIT compilers and loaders"),
    code("torch.serialization.load", "loads another checkpoint, not scanned here [picklescan]"),
    code("torch._inductor.*", "codecache.compile_file runs a compiler command [picklescan]"),
    code("torch._dynamo.*", "GuardBuilder.get evaluates guard source [picklescan]"),
    code("torch.fx.*", "symbolic_shapes evaluates guard expressions, graph modules run code [picklescan]"),
    code("torch.jit.*", "TorchScript runs code; execWrapper executes a string [picklescan]"),
    code("torch.hub.*", "downloads and runs repositories' hubconf.py"),
    code("torch.utils.collect_env.*", "run executes a command [picklescan]"),
    code("torch.utils.bottleneck.*", "run_cprofile executes a script [picklescan]"),
    code("torch.utils._config_module.*", "load_config unpickles a nested pickle [picklescan]"),
    code("torch.utils.data.datapipes.utils.decoder.*", "basichandlers unpickles a nested pickle [picklescan]"),
    // --- files, network, other processes
    code("io.open", "opens any file [modelscan]"),
    code("_io.*", "io's implementation: open, FileIO [modelscan]"),
    code("io.FileIO", "opens any file"),
    code("codecs.open", "opens any file"),
    code("shutil.*", "copies, moves and removes trees [picklescan]"),
    code("tempfile.*", "creates files and directories"),
    code("glob.*", "lists the file system"),
    code("zipimport.*", "imports code from an archive [modelscan]"),
    code("logging.config.*", "listen/fileConfig evaluate configuration [modelscan]"),
    code("socket.*", "opens connections [picklescan]"),
    code("ssl.*", "get_server_certificate connects out (DNS exfiltration) [picklescan]"),
    code("http.*", "http.client connects out [picklescan httplib]"),
    code("httplib.*", "Python 2 http.client [picklescan]"),
    code("urllib.*", "fetches URLs [modelscan]"),
    code("urllib2.*", "Python 2 urllib [modelscan]"),
    code("requests.*", "fetches URLs [picklescan, modelscan]"),
    code("httpx.*", "fetches URLs [modelscan]"),
    code("aiohttp.*", "fetches URLs [picklescan]"),
    code("asyncio.*", "subprocesses and connections [picklescan]"),
    code("ftplib.*", "connects out [modelscan]"),
    code("smtplib.*", "connects out [modelscan]"),
    code("telnetlib.*", "connects out [modelscan]"),
    code("imaplib.*", "IMAP4_stream runs a command [corpus]"),
    code("poplib.*", "connects out"),
    code("nntplib.*", "connects out"),
    code("webbrowser.*", "opens URLs with a browser command [picklescan]"),
    code("multiprocessing.*", "starts processes, connects to managers"),
    code("venv.*", "creates environments, runs pip [picklescan]"),
    code("ensurepip.*", "_run_pip runs pip [picklescan]"),
    code("pip.*", "installs and runs packages [picklescan]"),
    code("distutils.*", "file_util.write_file writes any file, spawn runs commands [picklescan]"),
    code("setuptools.*", "runs build commands"),
    code("uuid._get_command_stdout", "runs a command [corpus]"),
    code("uuid._popen", "runs a command (older Pythons)"),
    // --- plain data: what pickle itself writes for builtin values
    data("builtins.set", "pickle's set below protocol 4 [torch-wo]"),
    data("builtins.frozenset", "pickle's frozenset below protocol 4"),
    data("builtins.bytearray", "pickle's bytearray below protocol 5 [torch-wo]"),
    data("builtins.complex", "complex numbers [torch-wo]"),
    data("builtins.slice", "slice values"),
    data("builtins.range", "range values"),
    data("builtins.list", "a list of the values given"),
    data("builtins.tuple", "a tuple of the values given"),
    data("builtins.dict", "a dict of the values given"),
    data("builtins.bytes", "bytes values"),
    data("builtins.str", "string values"),
    data("builtins.int", "integer values"),
    data("builtins.float", "float values"),
    data("builtins.bool", "boolean values"),
    data("_codecs.encode", "pickle's bytes below protocol 3: encode(text, 'latin1') [torch-wo]"),
    data("collections.OrderedDict", "an ordered dict [torch-wo, picklescan safe list]"),
    data("collections.Counter", "a dict of counts [torch-wo]"),
    data("collections.deque", "a double-ended list"),
    data("datetime.datetime", "a date and time value"),
    data("datetime.date", "a date value"),
    data("datetime.time", "a time value"),
    data("datetime.timedelta", "a duration value"),
    data("datetime.timezone", "a fixed UTC offset"),
    data("decimal.Decimal", "a decimal number"),
    data("fractions.Fraction", "a rational number"),
    data("uuid.UUID", "a UUID value"),
    // --- arrays: numpy's own reducers, joblib's wrapper
    data("numpy.dtype", "an array's element type [numpy, picklescan safe list]"),
    data("numpy.ndarray", "the array class numpy's reducer names [numpy, picklescan safe list]"),
    data("numpy._core.multiarray._reconstruct", "numpy 2's array reducer [numpy, picklescan safe list]"),
    data("numpy.core.multiarray._reconstruct", "numpy 1's array reducer [numpy, picklescan safe list]"),
    data("numpy._core.multiarray.scalar", "numpy 2's scalar reducer: a dtype and its bytes [numpy]"),
    data("numpy.core.multiarray.scalar", "numpy 1's scalar reducer [numpy]"),
    data("numpy._core.numeric._frombuffer", "numpy 2's protocol 5 array reducer: bytes to array [numpy]"),
    data("numpy.core.numeric._frombuffer", "numpy 1's protocol 5 array reducer [numpy]"),
    data("numpy.dtypes.*DType", "numpy 2's dtype classes"),
    data("numpy.ma.core._mareconstruct", "numpy's masked array reducer [numpy]"),
    data("joblib.numpy_pickle.NumpyArrayWrapper", "joblib's stand-in for an array whose bytes follow it; an object array's nested pickle is scanned too"),
    // --- tensors: what torch.load(weights_only=True) admits
    data("torch._utils._rebuild_tensor", "tensor from a storage [torch-wo]"),
    data("torch._utils._rebuild_tensor_v2", "tensor from a storage [torch-wo, picklescan safe list]"),
    data("torch._utils._rebuild_tensor_v3", "tensor from a storage [torch-wo]"),
    data("torch._utils._rebuild_parameter", "parameter from a tensor [torch-wo]"),
    data("torch._utils._rebuild_parameter_with_state", "parameter with attributes [torch-wo]"),
    data("torch._utils._rebuild_sparse_tensor", "sparse tensor [torch-wo]"),
    data("torch._utils._rebuild_qtensor", "quantized tensor [torch-wo]"),
    data("torch._utils._rebuild_meta_tensor_no_storage", "meta tensor [torch-wo]"),
    data("torch._utils._rebuild_wrapper_subclass", "tensor subclass shell [torch-wo]"),
    data("torch._utils._rebuild_device_tensor_from_cpu_tensor", "device tensor [torch-wo]"),
    data("torch._utils._rebuild_device_tensor_from_numpy", "device tensor from an array [torch-wo]"),
    data("torch._tensor._rebuild_from_type_v2", "tensor subclass; calls its first argument, itself a global classified on its own [torch-wo]"),
    data("torch.nn.parameter.Parameter", "parameter class [torch-wo]"),
    data("torch.serialization._get_layout", "tensor layout by name [torch-wo]"),
    data("torch.Size", "tensor shape [torch-wo]"),
    data("torch.Tensor", "tensor class [torch-wo]"),
    data("torch.device", "device by name [torch-wo]"),
    data("torch.*Storage", "typed storage classes (FloatStorage...) [torch-wo, picklescan safe list]"),
    data("torch.storage.TypedStorage", "storage class [torch-wo]"),
    data("torch.storage.UntypedStorage", "storage class [torch-wo]"),
    data("torch.*Tensor", "legacy tensor type classes [torch-wo]"),
    data("torch.cuda.*Tensor", "legacy CUDA tensor type classes [torch-wo]"),
    data("torch.float*", "dtypes [torch-wo]"),
    data("torch.bfloat16", "dtype [torch-wo]"),
    data("torch.half", "dtype [torch-wo]"),
    data("torch.double", "dtype [torch-wo]"),
    data("torch.int*", "dtypes [torch-wo]"),
    data("torch.uint*", "dtypes [torch-wo]"),
    data("torch.complex*", "dtypes [torch-wo]"),
    data("torch.bcomplex32", "dtype [torch-wo]"),
    data("torch.bool", "dtype [torch-wo]"),
    data("torch.bits*", "dtypes [torch-wo]"),
    data("torch.qint*", "quantized dtypes [torch-wo]"),
    data("torch.quint*", "quantized dtypes [torch-wo]"),
    data("torch.per_*", "quantization schemes [torch-wo]"),
];

/// Python 2 module names that Python 3's unpickler maps to these (`_compat_pickle`).
fn python3_module(module: &str) -> &str {
    match module {
        "__builtin__" | "exceptions" => "builtins",
        "copy_reg" => "copyreg",
        other => other,
    }
}

/// The class of `module.name` and why. A dotted name is a path of attribute lookups that
/// `find_class` follows from the module (`myapp.tasks` + `os.system` reaches the `os` module
/// the task module imported), so it is `code` whatever the module.
pub fn classify(module: &str, name: &str) -> (Risk, &'static str) {
    if name.contains('.') {
        return (Risk::Code, "a dotted name: find_class follows attributes from the module, reaching what it imports [corpus]");
    }
    let module = python3_module(module);
    let matching = |risk: Risk| {
        RULES
            .iter()
            .find(|r| r.risk == risk && rule_matches(r.pattern, module, name))
    };
    match matching(Risk::Code).or_else(|| matching(Risk::Data)) {
        Some(rule) => (rule.risk, rule.why),
        None => (
            Risk::Unknown,
            "not in picklegate's reviewed lists: its own code runs when it is built",
        ),
    }
}

fn rule_matches(pattern: &str, module: &str, name: &str) -> bool {
    let (rule_module, rule_name) = pattern
        .rsplit_once('.')
        .expect("every pattern is module.name");
    if rule_name == "*" {
        return module == rule_module
            || module
                .strip_prefix(rule_module)
                .is_some_and(|rest| rest.starts_with('.'));
    }
    module == rule_module && name_matches(rule_name.as_bytes(), name.as_bytes())
}

/// `*` matches any run of characters of the name (which has no dots: dotted names are `code`).
fn name_matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| name_matches(rest, &name[skip..])),
        Some((c, rest)) => name.first() == Some(c) && name_matches(rest, &name[1..]),
    }
}

/// The class of an import the scan could not name (an EXT code, a computed STACK_GLOBAL): it
/// may resolve to anything.
pub const UNRESOLVED: (Risk, &str) =
    (Risk::Code, "an import whose target the scan cannot name: copyreg extension codes and computed names resolve to anything");

#[cfg(test)]
mod tests {
    use super::*;

    fn class(global: &str) -> Risk {
        let (module, name) = global.rsplit_once('.').unwrap();
        classify(module, name).0
    }

    #[test]
    fn payload_gadgets_are_code() {
        for global in [
            "os.system",
            "posix.system",
            "nt.system",
            "subprocess.Popen",
            "builtins.eval",
            "__builtin__.eval",
            "builtins.getattr",
            "builtins.__import__",
            "pkgutil.resolve_name",
            "operator.attrgetter",
            "functools.partial",
            "marshal.loads",
            "runpy._run_code",
            "torch._inductor.codecache.compile_file",
            "importlib.import_module",
            "sys.modules",
            "pickle.loads",
            "_pickle.loads",
            "timeit.timeit",
            "cProfile.run",
            "uuid._get_command_stdout",
            "imaplib.IMAP4_stream",
            "pydoc.pipepager",
            "code.InteractiveInterpreter",
            "types.FunctionType",
            "builtins.map",
            "dill._dill._create_code",
            "copy_reg.add_extension",
            "atexit.register",
            "torch.storage._load_from_bytes",
            "builtins.iter",
        ] {
            assert_eq!(class(global), Risk::Code, "{global}");
        }
        assert_eq!(classify("myapp.tasks", "os.system").0, Risk::Code);
        assert_eq!(
            classify("collections", "OrderedDict.fromkeys").0,
            Risk::Code
        );
    }

    #[test]
    fn checkpoint_and_array_builders_are_data() {
        for global in [
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch.FloatStorage",
            "torch.float32",
            "torch.nn.parameter.Parameter",
            "numpy._core.multiarray._reconstruct",
            "numpy.dtype",
            "numpy.ndarray",
            "joblib.numpy_pickle.NumpyArrayWrapper",
            "__builtin__.set",
            "_codecs.encode",
            "numpy.dtypes.Float64DType",
            "torch.per_tensor_affine",
            "torch.LongTensor",
        ] {
            assert_eq!(class(global), Risk::Data, "{global}");
        }
    }

    #[test]
    fn library_classes_are_unknown() {
        for global in [
            "sklearn.tree._classes.DecisionTreeClassifier",
            "torch.nn.modules.linear.Linear",
            "copyreg._reconstructor",
            "builtins.object",
            "types.SimpleNamespace",
            "pandas.core.frame.DataFrame",
            "numpy.random._pickle.__randomstate_ctor",
        ] {
            assert_eq!(class(global), Risk::Unknown, "{global}");
        }
    }

    #[test]
    fn code_wins_over_data_and_worst_sorts_first() {
        // torch.* data patterns must not admit torch's code entry points
        assert_eq!(class("torch.load"), Risk::Code);
        assert_eq!(class("torch.jit._script.RecursiveScriptModule"), Risk::Code);
        assert!(Risk::Code < Risk::Unknown && Risk::Unknown < Risk::Data);
        // a name pattern stays inside its module: torch.int* is not torch.internal.anything
        assert_eq!(classify("torch.interp", "run").0, Risk::Unknown);
        assert_eq!(classify("torch.nn.x", "EvilTensor").0, Risk::Unknown);
        assert_eq!(
            class("os.path.join"),
            Risk::Code,
            "a module-wide entry covers its submodules"
        );
        assert_eq!(class("osx.thing"), Risk::Unknown);
        assert_eq!(
            [Risk::Data, Risk::Code, Risk::Unknown].into_iter().min(),
            Some(Risk::Code)
        );
    }

    #[test]
    fn every_entry_says_why_and_patterns_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for rule in RULES {
            assert!(!rule.why.is_empty(), "{}", rule.pattern);
            assert!(seen.insert(rule.pattern), "{} twice", rule.pattern);
        }
    }
}
