"""How llama.cpp is built for this platform: the one place that says so.

llama-cpp-python compiles llama.cpp when it is installed. Which CPU kernels end up in the
library depends on the compiler flags, and one of them is broken: llama.cpp's AMX matrix
kernel (``ggml_backend_amx_mul_mat``) crashes with SIGSEGV on the first multi-token prompt on
Intel Xeons with AMX (Sapphire Rapids and newer; ggml-org/llama.cpp#20824, unfixed in the
llama.cpp that llama-cpp-python 0.3.36 vendors). So every build here turns AMX off:

* ``native`` (``make``, ``.ci/run``): tuned for the machine it is built on (``GGML_NATIVE``),
  with ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` so that ``-march=native`` cannot switch
  the AMX kernel on. Drop those three flags once the pinned llama.cpp contains a fix for
  #20824 (and the AMX test in ``tests/test_llama_build.py`` passes on an AMX machine without
  them).
* ``portable`` and ``cuda`` (``docker/Dockerfile``): ``GGML_NATIVE=off``, which builds
  AVX/AVX2/FMA/F16C kernels that run on any x86-64 server of the last decade and never
  enables AMX; ``cuda`` adds the CUDA backend.

Every build records its configuration in the compiled library itself: the flags go in with
``-frecord-gcc-switches`` together with ``-frandom-seed=llmp-<id>``, where the id is a hash
of this file's configuration. ``installed_build_ids()`` reads it back from the ELF section
``.GCC.command.line``, so a test can prove on any machine which configuration the installed
library was compiled with.

pip caches a built wheel under the sdist's name whatever CMAKE_ARGS were, so a machine that
once built another configuration would silently reuse it. This tool therefore never lets pip
pick a cached wheel (``--no-cache-dir``) and keeps its own cache, keyed by the build id, in
``~/.cache/llmplatform/llama-wheels/<id>/``.

Usage::

    python tools/llama_build.py install [--variant native]   # build (or reuse) and install the wheel
    python tools/llama_build.py cmake-args [--variant cuda]   # print CMAKE_ARGS for a variant
    python tools/llama_build.py id [--variant native]         # print the build id
    python tools/llama_build.py server                        # build llama-server and llama-batched-bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"

# -mno-amx-*: keep the AMX kernel out of native builds (llama.cpp#20824, see above).
AMX_OFF = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")

# Per variant: the CMake definitions, and the extra C/C++ flags.
VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "native": {"cmake": ("-DGGML_NATIVE=ON",), "cflags": AMX_OFF},
    "portable": {"cmake": ("-DGGML_NATIVE=OFF",), "cflags": ()},
    "cuda": {
        "cmake": (
            "-DGGML_NATIVE=OFF",
            "-DGGML_CUDA=ON",
            # 70 V100, 75 T4, 80 A100, 86 RTX 30xx/A10, 89 RTX 40xx/L4, 90 H100/H200
            "-DCMAKE_CUDA_ARCHITECTURES=70;75;80;86;89;90",
            # No GPU at build time: link libcuda against the toolkit's stub.
            "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined",
        ),
        "cflags": (),
    },
}
DEFAULT_VARIANT = "native"
# A switch that GCC records and that changes no code (it seeds names of anonymous symbols): the
# build id travels in it, because -frecord-gcc-switches leaves out -D definitions.
MARKER = "-frandom-seed=llmp-"

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmplatform"


def build_id(variant: str = DEFAULT_VARIANT) -> str:
    """A short hash of everything that decides what the build of ``variant`` contains."""
    config = {"package": f"{PACKAGE}=={VERSION}", "variant": variant, "marker": MARKER, **VARIANTS[variant]}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def cflags(variant: str = DEFAULT_VARIANT) -> list[str]:
    """The C/C++ flags of ``variant``, with the switches that record them in the binary."""
    return [*VARIANTS[variant]["cflags"], "-frecord-gcc-switches", f"{MARKER}{build_id(variant)}"]


def cmake_args(variant: str = DEFAULT_VARIANT, *, extra: list[str] = ()) -> list[str]:
    flags = " ".join(cflags(variant))
    return [*VARIANTS[variant]["cmake"], f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}", *extra]


def cmake_args_env(variant: str = DEFAULT_VARIANT, *, extra: list[str] = ()) -> str:
    """CMAKE_ARGS as scikit-build-core reads it (split like a shell command line)."""
    return shlex.join(cmake_args(variant, extra=extra))


# --- reading back what a library was built with ------------------------------------------

def recorded_switches(library: Path) -> list[str]:
    """The compiler switches that ``-frecord-gcc-switches`` stored in an ELF file."""
    out = subprocess.run(["readelf", "--string-dump=.GCC.command.line", str(library)],
                         capture_output=True, text=True, check=False).stdout
    switches = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("[") and "]" in line:
            switches.extend(line.split("]", 1)[1].split())
    return switches


def llama_libraries() -> list[Path]:
    """The llama.cpp shared libraries of the installed llama_cpp package."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return []
    lib_dir = Path(spec.origin).parent / "lib"
    return sorted(p for p in lib_dir.glob("lib*.so") if p.is_file())


def variant_of(build: str) -> str | None:
    """The variant whose build id is ``build``, or None when no configuration here has that id."""
    return next((variant for variant in VARIANTS if build_id(variant) == build), None)


# The libraries built from C/C++ sources with CMAKE_C(XX)_FLAGS; each must carry the build id.
BUILT_LIBRARIES = ("libggml-base.so", "libggml-cpu.so", "libllama.so")


def installed_build_ids() -> dict[str, set[str]]:
    """For each installed llama.cpp library, the build ids recorded in it (empty: none)."""
    return {
        lib.name: {s[len(MARKER):] for s in recorded_switches(lib) if s.startswith(MARKER)}
        for lib in llama_libraries() if lib.name in BUILT_LIBRARIES
    }


def llama_system_info() -> str:
    """llama.cpp's own account of the CPU features it was compiled with, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, check=True).stdout.strip()


# --- building ----------------------------------------------------------------------------

def _run(cmd: list[str], **kwargs) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def wheel_path(variant: str) -> Path | None:
    wheels = sorted((CACHE / "llama-wheels" / build_id(variant)).glob("*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(variant: str) -> Path:
    """Build the wheel of ``variant`` unless this machine's cache already has it."""
    cached = wheel_path(variant)
    if cached:
        print(f"llama.cpp build {build_id(variant)} ({variant}): reusing {cached}", flush=True)
        return cached
    target = CACHE / "llama-wheels" / build_id(variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Compiling llama.cpp ({variant}, build {build_id(variant)}); on 2 cores this takes ~5 minutes...",
          flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        env = {**os.environ, "CMAKE_ARGS": cmake_args_env(variant),
               # keep .GCC.command.line: scikit-build-core strips installed libraries by default
               "SKBUILD_INSTALL_STRIP": "false", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
              "--no-binary", PACKAGE, "--wheel-dir", tmp, f"{PACKAGE}=={VERSION}"], env=env)
        (built,) = Path(tmp).glob("*.whl")
        staged = Path(tmp) / "wheel"
        staged.mkdir()
        shutil.move(str(built), staged / built.name)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # atomic: a killed build leaves no half wheel in the cache
    return target / built.name


def install(variant: str) -> None:
    wheel = build_wheel(variant)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--force-reinstall",
          "--no-deps", str(wheel)])
    # its dependencies, from the index (never another llama-cpp-python)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "typing-extensions>=4.5.0", "diskcache>=5.6.1",
          "jinja2>=2.11.3", "numpy>=1.20.0"])
    ids = installed_build_ids()
    if set(ids) != set(BUILT_LIBRARIES) or any(build_id(variant) not in found for found in ids.values()):
        sys.exit(f"installed llama.cpp does not carry build {build_id(variant)}: {ids}")
    print(llama_system_info(), flush=True)
    print(f"llama.cpp build {build_id(variant)} ({variant}) installed", flush=True)


def sdist() -> Path:
    """The pinned llama-cpp-python source archive (it vendors llama.cpp)."""
    target = CACHE / "sdist"
    found = sorted(target.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          "--dest", str(target), f"{PACKAGE}=={VERSION}"])
    return sorted(target.glob(f"llama_cpp_python-{VERSION}.tar.gz"))[0]


def build_server(variant: str = DEFAULT_VARIANT) -> Path:
    """Build llama.cpp's own ``llama-server`` and ``llama-batched-bench`` from the same sources
    and with the same configuration as the installed library; returns their directory."""
    bin_dir = CACHE / "llama-server" / build_id(variant)
    if (bin_dir / "llama-server").exists() and (bin_dir / "llama-batched-bench").exists():
        return bin_dir
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist()) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF",
              *cmake_args(variant)])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "llama-batched-bench",
              "-j", str(os.cpu_count() or 2)])
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in ("llama-server", "llama-batched-bench"):
            shutil.copy2(build / "bin" / name, bin_dir / name)
    return bin_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install", "cmake-args", "id", "server"])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=DEFAULT_VARIANT)
    args = parser.parse_args()
    if args.command == "install":
        install(args.variant)
    elif args.command == "cmake-args":
        print(cmake_args_env(args.variant))
    elif args.command == "id":
        print(build_id(args.variant))
    else:
        print(build_server(args.variant))


if __name__ == "__main__":
    main()
