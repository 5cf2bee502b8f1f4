/* Red team 5 E7, the other side: a program linked to libpython runs a first runtime (Py_Initialize,
   Py_FinalizeEx), then starts a second one through the entry point named by argv[1]. The preload
   must still see that call (its wrapper reports a runtime started again after Py_FinalizeEx),
   whichever of its six entry points the program uses. */
#include <Python.h>
#include <string.h>
#include <wchar.h>
#define CODE "print('second runtime ran', flush=True)"
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *entry = argv[1];
    Py_NoSiteFlag = 1;
    Py_Initialize();
    PyRun_SimpleString("pass");
    Py_FinalizeEx();
    char *args[] = {"python", "-S", "-c", CODE, NULL};
    wchar_t *wide[] = {L"python", L"-S", L"-c", L"" CODE, NULL};
    if (!strcmp(entry, "Py_BytesMain")) return Py_BytesMain(4, args);
    if (!strcmp(entry, "Py_Main")) return Py_Main(4, wide);
    if (!strcmp(entry, "Py_FrozenMain")) return Py_FrozenMain(1, args); /* no frozen __main__: fails after */
    if (!strcmp(entry, "Py_Initialize")) Py_Initialize();
    else if (!strcmp(entry, "Py_InitializeEx")) Py_InitializeEx(0);
    else if (!strcmp(entry, "Py_InitializeFromConfig")) {
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.site_import = 0;
        PyStatus status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) Py_ExitStatusException(status);
    } else return 2;
    PyRun_SimpleString(CODE);
    return Py_FinalizeEx();
}
