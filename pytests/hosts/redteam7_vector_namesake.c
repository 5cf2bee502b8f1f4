/* Red team 7 P1: a program that is not Python, linked to a library exporting a namesake
   Py_Initialize that takes a 256-bit vector argument (in ymm0 under the SysV ABI). The preload's
   trampoline saves xmm0-7 only (the low 128 bits), and glibc's AVX string functions that run in
   between end with vzeroupper, which clears the upper halves. (With -DWIDE -mavx512f, Py_Main
   takes a 512-bit one, zmm0: the same.) Built -DLIBRARY: the library; else the program. */
#include <immintrin.h>
#include <stdio.h>
#ifdef LIBRARY
void Py_Initialize(__m256d v) {
    double d[4];
    _mm256_storeu_pd(d, v);
    printf("Py_Initialize %g %g %g %g\n", d[0], d[1], d[2], d[3]);
}
#ifdef WIDE
int Py_Main(__m512d v) {
    double d[8];
    _mm512_storeu_pd(d, v);
    printf("Py_Main %g %g %g %g %g %g %g %g\n", d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
    return 0;
}
#endif
#else
void Py_Initialize(__m256d v);
int Py_Main(__m512d v);
int main(void) {
    Py_Initialize(_mm256_set_pd(4.0, 3.0, 2.0, 1.0));
#ifdef WIDE
    Py_Main(_mm512_set_pd(8, 7, 6, 5, 4, 3, 2, 1));
#endif
    fflush(stdout);
    return 0;
}
#endif
