/* Red team 5 E7: a program that is not Python, linked to a library whose functions happen to be
   called as CPython's start-up functions the preload wraps, with other signatures: more arguments
   (Py_BytesMain, Py_FrozenMain), a vector argument (Py_Initialize), a variadic function with
   arguments on the stack (Py_InitializeEx), a pointer in and out (Py_InitializeFromConfig, whose
   CPython namesake returns a struct by value); Py_Main has CPython's own signature. */
#include <stdarg.h>
#include <stdio.h>
#ifdef LIBRARY
int Py_BytesMain(int argc, char **argv, const char *tag) { printf("Py_BytesMain %d %s\n", argc, tag); return 7; }
int Py_Main(int argc, char **argv) { printf("Py_Main %d\n", argc); return 3; }
int Py_FrozenMain(int argc, char **argv, const char *tag) { printf("Py_FrozenMain %d %s\n", argc, tag); return 5; }
int Py_Initialize(double scale, const char *tag) { printf("Py_Initialize %.2f %s\n", scale, tag); return 11; }
int Py_InitializeEx(const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vprintf(format, args);
    va_end(args);
    return n > 0 ? 13 : -1;
}
const char *Py_InitializeFromConfig(const char *tag) { printf("Py_InitializeFromConfig %s\n", tag); return tag + 4; }
#else
int Py_BytesMain(int, char **, const char *);
int Py_Main(int, char **);
int Py_FrozenMain(int, char **, const char *);
int Py_Initialize(double, const char *);
int Py_InitializeEx(const char *, ...);
const char *Py_InitializeFromConfig(const char *);
int main(int argc, char **argv) {
    int a = Py_BytesMain(argc, argv, "tag-ok");
    int b = Py_Main(argc, argv);
    int c = Py_FrozenMain(argc, argv, "frozen-ok");
    int d = Py_Initialize(2.5, "init-ok");
    int e = Py_InitializeEx("Py_InitializeEx %s %.1f %d %d %d %d %d %.1f\n", "ex-ok", 0.5, 1, 2, 3, 4, 5, 6.5);
    const char *f = Py_InitializeFromConfig("cfg-config-ok");
    printf("rc %d %d %d %d %d %s\n", a, b, c, d, e, f);
    return 0;
}
#endif
