/* Red team 5 E7: a program that is not Python, linked to a library whose functions happen to
   be called Py_BytesMain (with a third argument) and Py_Main. */
#include <stdio.h>
#ifdef LIBRARY
int Py_BytesMain(int argc, char **argv, const char *tag) { printf("Py_BytesMain %d %s\n", argc, tag); return 7; }
int Py_Main(int argc, char **argv) { printf("Py_Main %d\n", argc); return 3; }
#else
int Py_BytesMain(int, char **, const char *);
int Py_Main(int, char **);
int main(int argc, char **argv) {
    int a = Py_BytesMain(argc, argv, "tag-ok");
    int b = Py_Main(argc, argv);
    printf("rc %d %d\n", a, b);
    return 0;
}
#endif
