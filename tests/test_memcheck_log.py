"""scripts/memcheck.py's reading of a memcheck log: it fails on the memory errors whose stacks
pass through sparseroute's core and only counts the rest (the loader's, libc's, CPython's)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

LOG = """\
==61== Memcheck, a memory error detector
==61== Command: python -m pytest
==61==
==61== Invalid read of size 8
==61==    at 0x4023C6C: strncmp (strcmp-sse2.S:160)
==61==    by 0x4004BEE: is_dst (dl-load.c:216)
==61==  Address 0x75773d9 is 1 bytes after a block of size 168 alloc'd
==61==    at 0x48417B4: malloc (in vgpreload_memcheck-amd64-linux.so)
==61==
==61== Invalid write of size 4
==61==    at 0x1A2B3C: sparseroute_core::dispatch::scatter (in /x/sparseroute/_core.abi3.so)
==61==    by 0x1A2C00: sparseroute::permute (in /x/sparseroute/_core.abi3.so)
==61==  Address 0x9000010 is 0 bytes after a block of size 16 alloc'd
==61==    at 0x48417B4: malloc (in vgpreload_memcheck-amd64-linux.so)
==61==
==61== Conditional jump or move depends on uninitialised value(s)
==61==    at 0x1A2B3C: sparseroute_core::gating::select (in /x/sparseroute/_core.abi3.so)
==61==
==61== Invalid free() / delete / delete[] / realloc()
==61==    at 0x484317B: free (in vgpreload_memcheck-amd64-linux.so)
==61==    by 0x4A25094: PyMem_RawFree (obmalloc.c:100)
==61==
==61== ERROR SUMMARY: 3 errors from 3 contexts (suppressed: 0 from 0)
"""


@pytest.fixture(scope="module")
def memcheck():
    spec = importlib.util.spec_from_file_location("memcheck", ROOT / "scripts" / "memcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_are_the_memory_errors_with_their_stacks(memcheck):
    records = memcheck.error_records(LOG)
    assert [record[0] for record in records] == [
        "Invalid read of size 8",
        "Invalid write of size 4",
        "Invalid free() / delete / delete[] / realloc()",
    ]
    assert records[0][-1].endswith("(in vgpreload_memcheck-amd64-linux.so)")
    assert len(records[1]) == 5


def test_only_errors_through_the_core_fail(memcheck):
    ours = memcheck.core_errors(memcheck.error_records(LOG))
    assert [record[0] for record in ours] == ["Invalid write of size 4"]
    assert memcheck.core_errors(memcheck.error_records(LOG.replace("_core.abi3.so", "libtorch.so"))) == []


def test_the_default_tests_exist(memcheck):
    assert all((ROOT / "tests" / name).is_file() for name in memcheck.DEFAULT_TESTS)
    for test in memcheck.DESELECTED:
        file, name = test.split("::")
        assert f"def {name}(" in (ROOT / "tests" / file).read_text()
