"""cipa_bundle.runtime: glibc keeps freed memory mapped, so re-allocated tensors stop page-faulting.

Each measurement runs in a fresh interpreter: the setting is process-wide, and the test process must keep its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cipa_bundle.runtime import OPT_OUT_ENV_VAR

_PROBE = """
import json, resource, sys
import torch
from cipa_bundle.runtime import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else None
# A chain of elementwise ops on 48 MiB tensors (above glibc's largest default mmap threshold, 32 MiB), as in a forward
# pass: each op allocates its output and the previous intermediate is freed.
x = torch.ones(48 * 2**20 // 4)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = x * 2.0
    b = a + 1.0
    del a
    c = b.sigmoid()
    del b
    del c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)


def _probe(retain: bool, **env: str) -> dict:
    # Nothing in the child's environment may pre-empt or alter the allocator behaviour under test.
    ignored = {"GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", OPT_OUT_ENV_VAR}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ignored}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if retain else "0"],
        env={**clean, **env}, capture_output=True, text=True, check=True, timeout=120,
    )
    return json.loads(result.stdout.splitlines()[-1])


@needs_glibc
def test_retained_memory_is_reused_without_page_faults() -> None:
    default = _probe(retain=False)
    retained = _probe(retain=True)
    assert retained["applied"] is True
    pages = 48 * 2**20 // 4096
    # glibc's default maps fresh memory for each of the three outputs of every pass, so their pages fault again
    # (all of them with 4 KiB pages; far fewer where transparent huge pages back the allocations).
    assert min(default["faults"][-3:]) > 0
    # Retained: after a few passes the outputs come from memory the process already has. The median of the last five
    # passes, because the kernel may still unmap or move a retained range behind the process's back now and then (a CI
    # run once saw one 48 MiB tensor fault again in one late pass: [0, 0, 12288]); what must hold is that the typical
    # pass reuses memory and that the late passes together fault less than a single default one.
    late = sorted(retained["faults"][-5:])
    assert late[2] < pages // 10, retained["faults"]
    assert sum(late) < min(default["faults"][-5:]), (retained["faults"], default["faults"])


@needs_glibc
def test_opt_out_and_the_users_own_glibc_settings_are_respected() -> None:
    assert _probe(retain=True, **{OPT_OUT_ENV_VAR: "0"})["applied"] is False
    assert _probe(retain=True, MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is False
    assert _probe(retain=True, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")["applied"] is False
    assert _probe(retain=True, GLIBC_TUNABLES="glibc.pthread.rseq=0")["applied"] is True


def test_thresholds_must_fit_a_c_int() -> None:
    from cipa_bundle.runtime import retain_freed_memory

    with pytest.raises(ValueError, match=r"trim_threshold=4294967296 is outside \[0, 2147483647\]"):
        retain_freed_memory(trim_threshold=2**32)


def test_the_console_script_applies_it_and_in_process_callers_do_not(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cipa_bundle.runtime
    from cipa_bundle.cli import main

    calls = []
    monkeypatch.setattr(cipa_bundle.runtime, "retain_freed_memory", lambda: calls.append(1) or True)
    command = ["summary", "--img_size", "128", "--dims", "32"]
    main(command)  # a caller inside its own process
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["cipa-bundle", *command])
    main()  # the console script and python -m cipa_bundle
    assert calls == [1]
    assert "total" in capsys.readouterr().out
