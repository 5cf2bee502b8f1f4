/* Red team 7 P7: a library that is not Python versions its Py_BytesMain (symbol versioning, as
   glibc does for its own functions): version V1, then V2 with another meaning, V1 kept for the
   programs linked before. A program linked against V1 must keep getting V1.
   Built -DV1 -Wl,--version-script=<V1 only>: the library as it was when the program was linked;
   -DV2 -Wl,--version-script=<V1 and V2>: the library now; else: the program. */
#include <stdio.h>
#if defined(V1)
int Py_BytesMain(int argc, char **argv) { (void)argc; (void)argv; puts("V1"); return 1; }
#elif defined(V2)
int old_main(int argc, char **argv) { (void)argc; (void)argv; puts("V1"); return 1; }
int new_main(int argc, char **argv) { (void)argc; (void)argv; puts("V2"); return 2; }
__asm__(".symver old_main,Py_BytesMain@V1");
__asm__(".symver new_main,Py_BytesMain@@V2");
#else
int Py_BytesMain(int, char **);
int main(int argc, char **argv) {
    int rc = Py_BytesMain(argc, argv);
    fflush(stdout);
    return rc;
}
#endif
