/* Red team 7 P3: CPython linked statically into the program (a distribution's libpython3.X.a),
   linked without -rdynamic/-export-dynamic: none of CPython's functions is in the dynamic symbol
   table, and main's call to Py_BytesMain is bound at link time (PyOxidizer-style single-file
   programs are built so). */
int Py_BytesMain(int, char **);
int main(int argc, char **argv) { return Py_BytesMain(argc, argv); }
