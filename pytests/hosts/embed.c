/* An embedding program for the preload tests: runs each CODE argument in a runtime of its own
   (Py_Initialize, code, Py_FinalizeEx), site disabled as with python -S. Built two ways:
   linked to libpython (-DLINKED: `embed CODE...`), or loading it at run time as uWSGI, mod_wsgi
   and PyInstaller do (`embed LIBPYTHON global|local|newlm CODE...`: dlopen RTLD_GLOBAL or
   RTLD_LOCAL, or dlmopen into a new namespace).
   With -DLINKED -DPLUGIN it is a plugin (`embed_main`) that a host built with -DPLUGIN_HOST loads
   RTLD_LOCAL, as Apache loads mod_wsgi (`embed_plugin_host PLUGIN CODE...`). */
#define _GNU_SOURCE /* dlmopen */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#ifdef LINKED
#include <Python.h>
#endif

#ifdef PLUGIN_HOST
int main(int argc, char **argv) {
    void *plugin = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!plugin) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    int (*embed_main)(int, char **) = (int (*)(int, char **))dlsym(plugin, "embed_main");
    return embed_main ? embed_main(argc - 1, argv + 1) : 2;
}
#else
#ifdef PLUGIN
#define main embed_main
#endif
int main(int argc, char **argv) {
    void (*initialize)(void);
    int (*run)(const char *, void *);
    int (*finalize)(void);
    int *no_site;
    int first;
#ifdef LINKED
    initialize = Py_Initialize;
    run = (int (*)(const char *, void *))PyRun_SimpleStringFlags;
    finalize = Py_FinalizeEx;
    no_site = &Py_NoSiteFlag;
    first = 1;
#else
    if (argc < 3) { fprintf(stderr, "usage: embed LIBPYTHON global|local|newlm CODE...\n"); return 2; }
    int scope = strcmp(argv[2], "global") == 0 ? RTLD_GLOBAL : RTLD_LOCAL;
    void *lib = strcmp(argv[2], "newlm") == 0 ? dlmopen(LM_ID_NEWLM, argv[1], RTLD_NOW)
                                              : dlopen(argv[1], RTLD_NOW | scope);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    initialize = (void (*)(void))dlsym(lib, "Py_Initialize");
    run = (int (*)(const char *, void *))dlsym(lib, "PyRun_SimpleStringFlags");
    finalize = (int (*)(void))dlsym(lib, "Py_FinalizeEx");
    no_site = (int *)dlsym(lib, "Py_NoSiteFlag");
    if (!initialize || !run || !finalize || !no_site) { fprintf(stderr, "dlsym: %s\n", dlerror()); return 2; }
    first = 3;
#endif
    for (int i = first; i < argc; i++) {
        *no_site = 1;
        initialize();
        int rc = run(argv[i], NULL);
        fprintf(stderr, "[embed] runtime %d -> %d\n", i - first + 1, rc);
        finalize();
    }
    return 0;
}
#endif
