/* Red team 7 P2: the preload remembers the objects its looks have seen by load address. A library
   that is not CPython is loaded, seen (a dlsym on it makes the preload look), and unloaded; a
   libpython of the same mapped size is then loaded at the same address, and started through a
   shim that is not CPython (its Py_BytesMain forwards to the next one, as red team 5's shim).
   Built -DPAD=N: the decoy (N bytes of .bss make its mapping as long as libpython's). -DSHIM: the
   shim. Else: the program, linked to the shim, `host DECOY LIBPYTHON CODE`, printing where the
   decoy and libpython land, then running CODE with Py_BytesMain. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#ifdef PAD
char redteam7_pad[PAD];
int redteam7_decoy(void) { return redteam7_pad[0]; }
#elif defined(SHIM)
int Py_BytesMain(int argc, char **argv) {
    int (*next)(int, char **) = (int (*)(int, char **))dlsym(RTLD_NEXT, "Py_BytesMain");
    return next ? next(argc, argv) : 2;
}
#else
int Py_BytesMain(int, char **);
static unsigned long base(void *handle) {
    struct link_map *map = 0;
    dlinfo(handle, RTLD_DI_LINKMAP, &map);
    return (unsigned long)map->l_addr;
}
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    void *decoy = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!decoy || !dlsym(decoy, "redteam7_decoy")) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    printf("decoy %lx\n", base(decoy));
    dlclose(decoy);
    void *python = dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL);
    if (!python) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    printf("libpython %lx\n", base(python));
    fflush(stdout);
    char *python_argv[] = {"python", "-S", "-c", argv[3], NULL};
    return Py_BytesMain(4, python_argv);
}
#endif
