/* Red team 5 E7, the other side: a shim that is not CPython defines Py_Main and forwards to the
   next one (libpython's) with dlsym(RTLD_NEXT): the preload jumps to the shim untouched, and a
   self-bound libpython (Debian's) then starts without another call reaching the preload.
   Built -DSHIM: the shim. Else: a program linked to the shim, then libpython (so its Py_Main is
   the shim's), that runs a first runtime (Py_Initialize, Py_FinalizeEx), then a second one with
   Py_Main. No Python.h: it is linked to a distribution's libpython, whose headers may be absent. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <wchar.h>
#ifdef SHIM
int Py_Main(int argc, wchar_t **argv) {
    int (*next)(int, wchar_t **) = (int (*)(int, wchar_t **))dlsym(RTLD_NEXT, "Py_Main");
    return next ? next(argc, argv) : 2;
}
#else
extern int Py_NoSiteFlag;
void Py_Initialize(void);
int Py_FinalizeEx(void);
int PyRun_SimpleStringFlags(const char *, void *);
int Py_Main(int, wchar_t **);
int main(void) {
    Py_NoSiteFlag = 1;
    Py_Initialize();
    PyRun_SimpleStringFlags("pass", 0);
    Py_FinalizeEx();
    wchar_t *argv[] = {L"python", L"-S", L"-c", L"print('second runtime ran', flush=True)", 0};
    return Py_Main(4, argv);
}
#endif
