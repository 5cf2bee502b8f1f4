/* Red team 4: a plugin linked to libpython (DT_NEEDED) that starts Python with Py_BytesMain, never
 * through Py_Initialize* or dlsym. With RT4_CODE set it runs that code from its constructor (inside
 * the host's dlopen/dlmopen); else it hands start() to the host, which calls it after dlopen. */
#include <stdio.h>
#include <stdlib.h>
extern int Py_BytesMain(int, char **);
void redteam4_register(int (*start)(const char *)) __attribute__((weak));
static int start(const char *code) {
    char *argv[] = {"python", "-S", "-c", (char *)code, NULL};
    return Py_BytesMain(4, argv);
}
__attribute__((constructor)) static void init(void) {
    const char *code = getenv("RT4_CODE");
    if (code) {
        fprintf(stderr, "[plugin] constructor: Py_BytesMain -> %d\n", start(code));
        return;
    }
    if (redteam4_register) redteam4_register(start);
}
