//! Callsites (`module:qualname`) and globals (`module.name`), and the `*` patterns that match them.
//! Also which modules count as "loaders": frames skipped when naming the code that asked for a load.

/// Modules whose frames are never the callsite: pickle itself, picklegate, and the libraries
/// that wrap pickle for their users (SPEC.md, "Callsite").
pub const BUILTIN_LOADERS: &[&str] = &[
    "pickle",
    "_pickle",
    "_compat_pickle",
    "copyreg",
    "picklegate",
    "torch.serialization",
    "torch._weights_only_unpickler",
    "joblib",
    "numpy.lib",
    "numpy.core",
    "numpy._core",
    "pandas.io",
    "dill",
    "cloudpickle",
];

/// True when `module` is `prefix` or a submodule of it.
pub fn in_package(module: &str, prefix: &str) -> bool {
    module == prefix
        || (module.len() > prefix.len()
            && module.starts_with(prefix)
            && module.as_bytes()[prefix.len()] == b'.')
}

/// True when frames of `module` are skipped when the callsite is named.
pub fn is_loader_module(module: &str, extra_loaders: &[String]) -> bool {
    BUILTIN_LOADERS.iter().any(|p| in_package(module, p))
        || extra_loaders.iter().any(|p| in_package(module, p))
}

/// Matches a callsite against `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = backtrack {
            // Let the last `*` eat one more character.
            backtrack = Some((star_p, star_t + 1));
            p = star_p + 1;
            t = star_t + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A callsite pattern such as `myapp.serving:load_model` or `multiprocessing.*`.
pub fn callsite_matches(pattern: &str, callsite: &str) -> bool {
    glob(pattern.as_bytes(), callsite.as_bytes())
}

/// A global pattern such as `collections.OrderedDict`, `myapp.tasks.*` or `myapp.**`, against
/// the global `(module, name)` an unpickler resolves. `*` never matches a dot, in the module part
/// or the name: `multiprocessing.*` is what the module `multiprocessing` itself holds, not
/// `multiprocessing.util.spawnv_passfds`. `**` also matches dots, but only in the module part, so
/// no pattern reaches the dotted name `pkg` + `os.system` that a protocol-4 pickle can ask for.
/// A pattern with a star never admits a name in `__main__` or `__mp_main__`: whatever module runs
/// as the program (a runner such as `python -m cProfile` too) is not a reviewed module.
pub fn global_matches(pattern: &str, module: &str, name: &str) -> bool {
    if !is_exact_global(pattern) && is_program_module(module) {
        return false;
    }
    let full = format!("{module}.{name}");
    global_glob(pattern.as_bytes(), full.as_bytes(), module.len() + 1)
}

/// The module Python runs as the program (`__main__`; `__mp_main__` in a spawned child).
fn is_program_module(module: &str) -> bool {
    module == "__main__" || module == "__mp_main__"
}

/// `global_matches` on `text` = module + "." + name, where `name_start` is where the name begins.
fn global_glob(pattern: &[u8], text: &[u8], name_start: usize) -> bool {
    enum Token {
        Star,
        DoubleStar,
        Byte(u8),
    }
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut i = 0;
    while i < pattern.len() {
        if pattern[i] == b'*' {
            let double = pattern.get(i + 1) == Some(&b'*');
            tokens.push(if double {
                Token::DoubleStar
            } else {
                Token::Star
            });
            i += if double { 2 } else { 1 };
            while pattern.get(i) == Some(&b'*') {
                i += 1; // `***` reads as `**`
            }
        } else {
            tokens.push(Token::Byte(pattern[i]));
            i += 1;
        }
    }
    // matches[j]: the tokens after the current one match text[j..].
    let mut matches = vec![false; text.len() + 1];
    matches[text.len()] = true;
    for token in tokens.iter().rev() {
        let mut current = vec![false; text.len() + 1];
        for j in (0..=text.len()).rev() {
            current[j] = match token {
                Token::Byte(c) => j < text.len() && text[j] == *c && matches[j + 1],
                Token::Star => matches[j] || (j < text.len() && text[j] != b'.' && current[j + 1]),
                Token::DoubleStar => {
                    matches[j]
                        || (j < text.len() && (text[j] != b'.' || j < name_start) && current[j + 1])
                }
            };
        }
        matches = current;
    }
    matches[0]
}

/// A global pattern that names one global exactly, with no `*`.
pub fn is_exact_global(pattern: &str) -> bool {
    !pattern.contains('*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callsite_patterns() {
        assert!(callsite_matches(
            "myapp.serving:load_model",
            "myapp.serving:load_model"
        ));
        assert!(!callsite_matches(
            "myapp.serving:load_model",
            "myapp.serving:load_model2"
        ));
        assert!(callsite_matches(
            "multiprocessing.*",
            "multiprocessing.connection:Connection.recv"
        ));
        assert!(callsite_matches("*:load", "a.b:load"));
        assert!(callsite_matches("a*b*c", "axxbyyc"));
        assert!(!callsite_matches("a*b*c", "axxbyy"));
        assert!(callsite_matches("*", ""));
        assert!(!callsite_matches("multiprocessing.*", "multiprocessingx:f"));
    }

    #[test]
    fn global_patterns_do_not_span_dotted_names() {
        assert!(global_matches(
            "collections.OrderedDict",
            "collections",
            "OrderedDict"
        ));
        assert!(global_matches(
            "multiprocessing.pool.*",
            "multiprocessing.pool",
            "worker"
        ));
        assert!(!global_matches("myapp.tasks.*", "myapp.tasks", "os.system"));
        assert!(global_matches(
            "myapp.tasks.Outer.Inner",
            "myapp.tasks",
            "Outer.Inner"
        ));
        assert!(!global_matches("collections.*", "os", "system"));
        assert!(global_matches("builtins.*Error", "builtins", "ValueError"));
        assert!(!global_matches(
            "builtins.*Error",
            "builtins",
            "ValueError.x"
        ));
    }

    #[test]
    fn a_star_never_crosses_a_dot_in_the_module_part() {
        // issue 11, finding 2: `multiprocessing.*` admitted multiprocessing.util.spawnv_passfds
        assert!(!global_matches(
            "multiprocessing.*",
            "multiprocessing.util",
            "spawnv_passfds"
        ));
        assert!(!global_matches(
            "multiprocessing.*",
            "multiprocessing.pool",
            "worker"
        ));
        assert!(global_matches(
            "multiprocessing.*",
            "multiprocessing",
            "Process"
        ));
        assert!(!global_matches("myapp.*", "myapp.tasks", "square"));
        assert!(global_matches("myapp.*.square", "myapp.tasks", "square"));
        assert!(!global_matches(
            "myapp.*.square",
            "myapp.tasks.deep",
            "square"
        ));
        assert!(!global_matches("*", "os", "system"));
    }

    #[test]
    fn a_double_star_spans_submodules_but_never_a_dotted_name() {
        assert!(global_matches("myapp.**", "myapp.tasks", "square"));
        assert!(global_matches("myapp.**", "myapp.tasks.deep", "square"));
        assert!(global_matches("myapp.**", "myapp", "square"));
        assert!(!global_matches("myapp.**", "myapp.tasks", "os.system"));
        assert!(!global_matches("myapp.**", "myappx.tasks", "square"));
        assert!(global_matches("myapp.***", "myapp.a.b", "c"));
        assert!(global_matches("**.square", "myapp.tasks", "square"));
        assert!(!global_matches("**", "myapp.tasks", "os.system"));
    }

    #[test]
    fn a_pattern_never_admits_the_program_module() {
        // red-team S6: under `python -m cProfile app.py`, `__main__.run` is cProfile's `run`
        assert!(!global_matches("__main__.*", "__main__", "run"));
        assert!(!global_matches("__mp_main__.*", "__mp_main__", "run"));
        assert!(!global_matches("__main__.**", "__main__", "run"));
        assert!(!global_matches("**", "__main__", "run"));
        assert!(!global_matches("*.run", "__main__", "run"));
        assert!(!global_matches("__main__.ru*", "__main__", "run"));
        assert!(global_matches("__main__.child", "__main__", "child"));
        assert!(global_matches("__mp_main__.child", "__mp_main__", "child"));
        assert!(global_matches("**", "myapp", "run"));
        assert!(global_matches("*.run", "myapp", "run"));
    }

    #[test]
    fn exact_globals_have_no_star() {
        assert!(is_exact_global("dask._expr.Expr._reconstruct"));
        assert!(!is_exact_global("builtins.*Error"));
    }

    #[test]
    fn loader_modules() {
        assert!(is_loader_module("pickle", &[]));
        assert!(is_loader_module("torch.serialization", &[]));
        assert!(is_loader_module("joblib.numpy_pickle", &[]));
        assert!(!is_loader_module("picklegate_demo", &[]));
        assert!(!is_loader_module("torch", &[]));
        assert!(is_loader_module("myorg.io.load", &["myorg.io".to_string()]));
    }
}
