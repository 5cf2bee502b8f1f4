/* A program (and, built with -DLIBRARY, a library it links) that load a library by a name the
   caller's RUNPATH or $ORIGIN resolves: `loader NAME program|library` prints the loaded foo(). */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#ifdef LIBRARY
void *load_from_library(const char *name) { return dlopen(name, RTLD_NOW); }
#elif defined(FOO)
int foo(void) { return FOO; }
#else
void *load_from_library(const char *name);
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    void *lib = strcmp(argv[2], "library") == 0 ? load_from_library(argv[1]) : dlopen(argv[1], RTLD_NOW);
    if (!lib) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    int (*foo)(void) = (int (*)(void))dlsym(lib, "foo");
    printf("foo() = %d\n", foo ? foo() : -1);
    return 0;
}
#endif
