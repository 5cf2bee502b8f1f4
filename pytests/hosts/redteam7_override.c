/* Red team 7 P16: ELF interposition between two libraries that are not Python. libB defines a
   default Py_Initialize and calls it through its PLT (b_start); libA, earlier in the program's
   search order, overrides it (as a malloc replacement overrides libc's): B's call reaches A's.
   Built -DLIB_A or -DLIB_B: the libraries; else the program, linked -lA -lB. */
#include <stdio.h>
#if defined(LIB_A)
void Py_Initialize(void) { puts("A override"); }
#elif defined(LIB_B)
void Py_Initialize(void) { puts("B default"); }
void b_start(void) { Py_Initialize(); }
#else
void b_start(void);
int main(void) {
    b_start();
    fflush(stdout);
    return 0;
}
#endif
