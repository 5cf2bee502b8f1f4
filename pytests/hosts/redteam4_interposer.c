/* Red team 4, C10: a user's own dlopen/dlsym interposer (as VirtualGL's libdlfaker, apitrace, Steam's
 * overlay), preloaded by the user: it redirects one library name and answers one symbol itself,
 * forwarding everything else to the next definitions (dlvsym, RTLD_NEXT). Built -DAPP: the program. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#ifdef APP
int main(void) {
    void *h = dlopen("libredteam4-redirected.so", RTLD_NOW);
    printf("dlopen: %s\n", h ? "redirected" : dlerror());
    int (*answer)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "redteam4_answer");
    printf("dlsym: %s\n", answer ? (answer() == 42 ? "answered" : "wrong") : "not answered");
    return 0;
}
#else
static int answer(void) { return 42; }
void *dlopen(const char *file, int flags) {
    static void *(*next)(const char *, int);
    if (!next) next = (void *(*)(const char *, int))dlvsym(RTLD_NEXT, "dlopen", "GLIBC_2.34");
    if (!next) next = (void *(*)(const char *, int))dlvsym(RTLD_NEXT, "dlopen", "GLIBC_2.2.5");
    if (file && strstr(file, "libredteam4-redirected")) file = "libm.so.6";
    return next(file, flags);
}
void *dlsym(void *handle, const char *name) {
    static void *(*next)(void *, const char *);
    if (!next) next = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!next) next = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (name && !strcmp(name, "redteam4_answer")) return (void *)answer;
    return next(handle, name);
}
#endif
