/* Attack host: loads libpython in ways the preload may not see, then runs CODE with site off.
   embed2 libcptr LIB CODE        dlopen through libc's own dlopen (dlsym on libc's handle)
   embed2 dlmode  LIB CODE        glibc's __libc_dlopen_mode
   embed2 second  LIB1 LIB2 CODE  dlopen LIB1 (armed, never started), then LIB2, start LIB2 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
typedef void *(*dlopen_t)(const char *, int);
static int run_in(void *lib, const char *code) {
    void (*init)(void) = (void (*)(void))dlsym(lib, "Py_Initialize");
    int (*run)(const char *, void *) = (int (*)(const char *, void *))dlsym(lib, "PyRun_SimpleStringFlags");
    int *no_site = (int *)dlsym(lib, "Py_NoSiteFlag");
    if (!init || !run || !no_site) { fprintf(stderr, "dlsym: %s\n", dlerror()); return 2; }
    *no_site = 1;
    init();
    int rc = run(code, NULL);
    fprintf(stderr, "[embed2] run -> %d\n", rc);
    return rc;
}
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    void *lib = NULL;
    if (!strcmp(argv[1], "libcptr")) {
        void *libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        dlopen_t real = (dlopen_t)dlsym(libc, "dlopen");
        fprintf(stderr, "[embed2] libc dlopen %p, global dlopen %p\n", (void *)real, (void *)dlopen);
        lib = real(argv[2], RTLD_NOW | (getenv("GLOBAL") ? RTLD_GLOBAL : RTLD_LOCAL));
    } else if (!strcmp(argv[1], "dlmode")) {
        void *libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        dlopen_t mode = (dlopen_t)dlvsym(libc, "__libc_dlopen_mode", "GLIBC_PRIVATE");
        if (!mode) { fprintf(stderr, "no __libc_dlopen_mode\n"); return 2; }
        lib = mode(argv[2], RTLD_NOW | RTLD_GLOBAL | 0x80000000 /* __RTLD_DLOPEN */);
    } else if (!strcmp(argv[1], "second")) {
        void *first = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
        if (!first) { fprintf(stderr, "dlopen 1: %s\n", dlerror()); return 2; }
        lib = dlopen(argv[3], RTLD_NOW | (getenv("GLOBAL") ? RTLD_GLOBAL : RTLD_LOCAL));
        argv++;
    }
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    return run_in(lib, argv[3]);
}
