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

/// Matches `text` against `pattern`, where `*` stands for any run of characters.
/// Characters at or after `dot_guard` may not be eaten by a `*` when they are dots: this keeps
/// `pkg.*` from matching the dotted name `pkg` + `os.system` a protocol-4 pickle can ask for.
fn glob(pattern: &[u8], text: &[u8], dot_guard: usize) -> bool {
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
            // Let the last `*` eat one more character, unless that character is guarded.
            if star_t >= dot_guard && text[star_t] == b'.' {
                return false;
            }
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
    glob(pattern.as_bytes(), callsite.as_bytes(), usize::MAX)
}

/// A global pattern such as `collections.OrderedDict` or `myapp.tasks.*`, against the global
/// `(module, name)` an unpickler resolves. A `*` never spans a dot inside `name`.
pub fn global_matches(pattern: &str, module: &str, name: &str) -> bool {
    let full = format!("{module}.{name}");
    glob(pattern.as_bytes(), full.as_bytes(), module.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callsite_patterns() {
        assert!(callsite_matches("myapp.serving:load_model", "myapp.serving:load_model"));
        assert!(!callsite_matches("myapp.serving:load_model", "myapp.serving:load_model2"));
        assert!(callsite_matches("multiprocessing.*", "multiprocessing.connection:Connection.recv"));
        assert!(callsite_matches("*:load", "a.b:load"));
        assert!(callsite_matches("a*b*c", "axxbyyc"));
        assert!(!callsite_matches("a*b*c", "axxbyy"));
        assert!(callsite_matches("*", ""));
        assert!(!callsite_matches("multiprocessing.*", "multiprocessingx:f"));
    }

    #[test]
    fn global_patterns_do_not_span_dotted_names() {
        assert!(global_matches("collections.OrderedDict", "collections", "OrderedDict"));
        assert!(global_matches("multiprocessing.pool.*", "multiprocessing.pool", "worker"));
        assert!(global_matches("multiprocessing.*", "multiprocessing.pool", "worker"));
        assert!(!global_matches("myapp.tasks.*", "myapp.tasks", "os.system"));
        assert!(global_matches("myapp.tasks.Outer.Inner", "myapp.tasks", "Outer.Inner"));
        assert!(!global_matches("collections.*", "os", "system"));
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
