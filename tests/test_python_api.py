"""LLM-Lab as a library: the names the README's "From Python" section imports."""

import subprocess
import sys


def test_lazy_top_level_names_are_listed_by_dir_and_stay_lazy():
    code = ("import sys, llmlab; names = dir(llmlab); "
            "print(all(n in names for n in llmlab.__all__), 'llmlab.model' in sys.modules, 'torch' in sys.modules, "
            "callable(llmlab.build_model) and callable(llmlab.load_model))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # dir() lists build_model and load_model (tab completion) without importing the model code or torch
    assert out == ["True", "False", "False", "True"]
