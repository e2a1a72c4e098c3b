"""The package as built: native modules present, the CUDA sources compiled wherever nvcc is."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import fastinterest
from fastinterest import _ext


def test_cpu_module_builds_and_reports():
    info = _ext.cpu().build_info()
    assert info["compiler"]
    assert info["simd_runtime"] in ("generic", "avx2+fma+f16c")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_sources_compiled_when_nvcc_present():
    # The package's build compiles csrc/cuda/*.cu whenever a CUDA compiler is found
    # (FASTINTEREST_WITH_CUDA=AUTO); with cudart linked statically it imports without a driver.
    mod = _ext._load("_C_cuda")[0]
    assert mod is not None, _ext._load("_C_cuda")[1]
    assert {"embedding_forward", "embedding_backward", "embedding_backward_workspace_bytes"} <= set(dir(mod))
    info = mod.build_info()
    assert "80" in info["archs"] and "90" in info["archs"]


def test_info_prints_the_backend_table():
    out = subprocess.run([sys.executable, "-m", "fastinterest.info"], capture_output=True, text=True, check=True).stdout
    assert "## embedding_bag" in out and "| cpu | float32 |" in out and "**chosen**" in out


def test_cli_lists_commands():
    from fastinterest.cli import build_parser

    assert "info" in build_parser().format_help()
    assert fastinterest.__version__
