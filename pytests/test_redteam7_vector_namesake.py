"""Red team 7 P1: the start-up trampolines (red team 5 E7) promise that a namesake of
``Py_Initialize*``/``Py_*Main`` outside a libpython gets "every argument register as the program
set it". They save xmm0-7, the low 128 bits: a namesake taking an AVX vector (``__m256d``, passed in
ymm0) gets its upper half zeroed (glibc's AVX string functions, run by the look-ups in between,
end with ``vzeroupper``). An innocent program that is not Python computes wrong values under
``LD_PRELOAD``, with no mode set (promise 2)."""

import os
import shutil
import subprocess

import pytest

from test_preload import preload_path

HOSTS = os.path.join(os.path.dirname(__file__), "hosts")


def _has_avx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx " in cpuinfo.read().replace("\n", " ")
    except OSError:
        return False


@pytest.mark.xfail(strict=True, reason="red team 7 P1: the trampolines save xmm0-7 only; a namesake's ymm "
                   "argument loses its upper half (open: saving ymm/zmm needs XSAVE in the trampoline)")
@pytest.mark.parametrize("mode", [None, "enforce"])
def test_a_namesake_taking_an_avx_vector_gets_it_whole(tmp_path, mode):
    gcc = shutil.which("gcc")
    if gcc is None or not _has_avx():
        pytest.skip("gcc or AVX is absent")
    source = os.path.join(HOSTS, "redteam7_vector_namesake.c")
    lib, host = tmp_path / "libnamesake.so", tmp_path / "host"
    subprocess.run([gcc, "-w", "-mavx", "-shared", "-fPIC", "-DLIBRARY", "-o", lib, source], check=True)
    subprocess.run([gcc, "-w", "-mavx", "-o", host, source, f"-L{tmp_path}", "-lnamesake",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKLEGATE_")}
    # glibc's AVX2 string functions (what a CPU without AVX-512 runs) all end with vzeroupper; on an
    # AVX-512 CPU glibc picks EVEX ones that leave ymm0-7 alone for some lengths only, so it is
    # told to use the AVX2 ones (the window is then deterministic).
    env["GLIBC_TUNABLES"] = "glibc.cpu.hwcaps=-AVX512VL,-AVX512F,-AVX512BW"
    plain = subprocess.run([host], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert (plain.returncode, plain.stdout) == (0, "Py_Initialize 1 2 3 4\n"), plain.stderr
    env["LD_PRELOAD"] = preload_path()
    if mode is not None:
        env["PICKLEGATE_MODE"] = mode
    preloaded = subprocess.run([host], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert (preloaded.returncode, preloaded.stdout, preloaded.stderr) == (0, "Py_Initialize 1 2 3 4\n", "")
