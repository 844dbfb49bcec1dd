"""The installed llama.cpp is the build that tools/llama_build.py defines, on any machine."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import llama_cpp

from tools import llama_build


def _installed_build() -> str:
    """The one build id recorded in every installed llama.cpp library."""
    found = llama_build.installed_build_ids()
    assert set(found) == set(llama_build.BUILT_LIBRARIES), f"llama.cpp libraries not found: {sorted(found)}"
    ids = set().union(*found.values())
    assert len(ids) == 1 and all(found.values()), f"the libraries carry different or no build ids: {found}"
    return ids.pop()


def test_the_installed_llama_cpp_was_built_with_a_configuration_of_tools_llama_build():
    build = _installed_build()
    assert llama_build.variant_of(build), (
        f"llama.cpp carries build {build}, which is none of tools/llama_build.py's "
        f"({ {v: llama_build.build_id(v) for v in llama_build.VARIANTS} }): reinstall it with make clean && make install")
    stamp = Path(sys.prefix) / ".installed"  # make install writes the build id it installed
    if stamp.exists():
        assert build == stamp.read_text().strip() == llama_build.build_id("native"), (
            "the .venv was installed with another configuration than tools/llama_build.py's native one: make install")


def test_the_cpu_kernels_were_compiled_with_every_flag_of_the_configuration():
    variant = llama_build.variant_of(_installed_build())
    (cpu_library,) = [lib for lib in llama_build.llama_libraries() if lib.name == "libggml-cpu.so"]
    switches = set(llama_build.recorded_switches(cpu_library))
    missing = [flag for flag in llama_build.VARIANTS[variant]["cflags"] if flag not in switches]
    assert not missing, f"libggml-cpu.so was compiled without {missing}"


def test_llama_cpp_has_no_amx_kernel():
    """llama.cpp's AMX matrix kernel crashes (llama.cpp#20824); on an AMX CPU this fails if it is built in."""
    info = llama_cpp.llama_print_system_info().decode()
    assert "CPU" in info, info
    assert not re.search(r"AMX_INT8 = 1", info), f"llama.cpp was built with its AMX kernel: {info}"


def test_a_changed_flag_changes_the_build_id():
    native = llama_build.VARIANTS["native"]
    try:
        before = llama_build.build_id("native")
        llama_build.VARIANTS["native"] = {**native, "cflags": native["cflags"][:-1]}
        assert llama_build.build_id("native") != before
    finally:
        llama_build.VARIANTS["native"] = native
    assert llama_build.build_id("native") == before
    assert len({llama_build.build_id(variant) for variant in llama_build.VARIANTS}) == len(llama_build.VARIANTS)


def test_cmake_args_carry_the_flags_as_one_shell_word_each():
    import shlex

    words = shlex.split(llama_build.cmake_args_env("native"))
    c_flags = next(word for word in words if word.startswith("-DCMAKE_C_FLAGS="))
    assert "-mno-amx-int8" in c_flags and f"-frandom-seed=llmp-{llama_build.build_id('native')}" in c_flags
    assert "-DGGML_NATIVE=ON" in words
