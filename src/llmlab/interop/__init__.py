"""Interoperability: Hugging Face transformers folders and hub ids in and out, GGUF out (and in, through
transformers' GGUF loader). The CLI's `import-hf`, `export-hf` and `export-gguf` call these.

    from llmlab.interop import import_hf, export_hf, export_gguf
    import_hf("HuggingFaceTB/SmolLM2-135M-Instruct", "runs/smollm")
"""

from llmlab.interop.gguf_io import export_gguf
from llmlab.interop.hf_io import export_hf, import_hf

__all__ = ["export_gguf", "export_hf", "import_hf"]
