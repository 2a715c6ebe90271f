"""llmlab.device's CPU allocator setting: freed memory is reused instead of faulted in afresh."""

import os
import platform
import subprocess
import sys

import pytest

from llmlab.device import tune_cpu_allocator
from llmlab.errors import ConfigError

# a 64 MiB buffer (above glibc's largest dynamic mmap threshold, 32 MiB, so glibc maps and unmaps it every
# time), written and freed 20 times after three warm-ups; prints the minor page faults of each
_FAULTS = """
import resource, sys, torch
from llmlab.device import tune_cpu_allocator
print(tune_cpu_allocator(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # (tuned, the heap settles in two)
    torch.empty(16 * 2**20).fill_(1.0)
counts = []
for _ in range(20):
    before = faults()
    torch.empty(16 * 2**20).fill_(1.0)
    counts.append(faults() - before)
print(sorted(counts)[10])
"""


def _faults(setting: str) -> tuple[int, str]:
    env = {**os.environ, "LLMLAB_CPU_MALLOC": setting, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip()), out.stderr.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_memory_where_the_default_faults_it_in_again():
    tuned, applied = _faults("tuned")
    default, not_applied = _faults("default")
    assert (applied, not_applied) == ("True", "False")
    pages = 64 * 2**20 // 4096  # every page of one buffer; the median buffer's faults:
    assert default > pages // 2, default  # glibc's default: fresh pages every time
    assert tuned < pages // 50, tuned  # tuned: the pages of an earlier buffer, reused (now and then a small
    # allocation splits the freed block and the next buffer grows the heap: hence the median)


def test_a_bad_allocator_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LLMLAB_CPU_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="LLMLAB_CPU_MALLOC: expected 'tuned' or 'default', got 'jemalloc'"):
        tune_cpu_allocator.__wrapped__()


def test_cpu_training_set_up_applies_it(monkeypatch):
    from llmlab.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "tune_cpu_allocator", lambda: calls.append(1))
    assert distributed.init_distributed("cpu").device.type == "cpu"
    assert calls == [1]
