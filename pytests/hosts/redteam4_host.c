/* Red team 4: hosts that start a libpython without a dlsym the preload sees, then run CODE.
 *   host dlopen  PLUGIN CODE FLAGS   dlopen(PLUGIN, RTLD_NOW | FLAGS: local, global, deepbind, joined
 *                                    with ','); the plugin's constructor registered start(): call it
 *   host dlmopen PLUGIN              dlmopen(LM_ID_NEWLM, PLUGIN): the plugin starts in its constructor
 *   host lazy    LIBPYTHON CODE      dlopen(LIBPYTHON, RTLD_GLOBAL), then Py_BytesMain through a weak,
 *                                    lazily bound PLT entry (built -no-pie -z lazy with -DLAZY) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
static int (*registered)(const char *);
void redteam4_register(int (*start)(const char *)) { registered = start; }
#ifdef LAZY
extern int Py_BytesMain(int, char **) __attribute__((weak));
#endif
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    if (!strcmp(argv[1], "dlmopen")) {
        void *h = dlmopen(LM_ID_NEWLM, argv[2], RTLD_NOW | RTLD_LOCAL);
        if (!h) { fprintf(stderr, "dlmopen: %s\n", dlerror()); return 2; }
        return 0;
    }
    if (argc < 4) return 2;
    if (!strcmp(argv[1], "dlopen")) {
        int flags = RTLD_NOW | RTLD_LOCAL;
        if (argc > 4 && strstr(argv[4], "deepbind")) flags |= RTLD_DEEPBIND;
        if (argc > 4 && strstr(argv[4], "global")) flags |= RTLD_GLOBAL;
        void *h = dlopen(argv[2], flags);
        if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
        if (!registered) return 0; /* the plugin ran in its constructor */
        int rc = registered(argv[3]);
        fprintf(stderr, "[host] start -> %d\n", rc);
        return rc;
    }
#ifdef LAZY
    if (!strcmp(argv[1], "lazy")) {
        if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
        char *args[] = {"python", "-S", "-c", argv[3], NULL};
        return Py_BytesMain(4, args);
    }
#endif
    return 2;
}
