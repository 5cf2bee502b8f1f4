/* Red team 4: a plugin linked to libpython (DT_NEEDED) that starts Python with Py_BytesMain (or
 * Py_FrozenMain, built -DFROZEN_MAIN), never through Py_Initialize* or dlsym. With RT4_CODE set it runs that code from its constructor (inside
 * the host's dlopen/dlmopen); else it hands start() to the host, which calls it after dlopen. */
#include <stdio.h>
#include <stdlib.h>
extern int Py_BytesMain(int, char **);
#ifdef FROZEN_MAIN
/* -DFROZEN_MAIN -include CODE.h (CODE.h: `static const unsigned char frozen_main[] = {...};`, the
 * marshalled code of the program, for this libpython's version): start() runs it with Py_FrozenMain,
 * as a program made by Tools/freeze does (CPython 3.11+'s struct _frozen). */
struct _frozen { const char *name; const unsigned char *code; int size; int is_package; void *get_code; };
extern const struct _frozen *PyImport_FrozenModules;
extern int Py_FrozenMain(int, char **);
static struct _frozen frozen[] = {{"__main__", frozen_main, (int)sizeof frozen_main, 0, NULL}, {NULL, NULL, 0, 0, NULL}};
#endif
void redteam4_register(int (*start)(const char *)) __attribute__((weak));
static int start(const char *code) {
#ifdef FROZEN_MAIN
    (void)code;
    PyImport_FrozenModules = frozen;
    char *frozen_argv[] = {"frozen", NULL};
    return Py_FrozenMain(1, frozen_argv);
#else
    char *argv[] = {"python", "-S", "-c", (char *)code, NULL};
    return Py_BytesMain(4, argv);
#endif
}
__attribute__((constructor)) static void init(void) {
    const char *code = getenv("RT4_CODE");
    if (code) {
        fprintf(stderr, "[plugin] constructor: Py_BytesMain -> %d\n", start(code));
        return;
    }
    if (redteam4_register) redteam4_register(start);
}
