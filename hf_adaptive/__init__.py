"""hf_adaptive: workload-adaptive inference for Hugging Face Transformers."""

__version__ = "0.1.0"
