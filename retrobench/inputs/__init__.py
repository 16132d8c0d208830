"""What a run feeds the engine besides the method: models, tokenizers and offline texts.

- :mod:`~retrobench.inputs.models` — load a model and tokenizer from ``conf/model/*.yaml``
  (hub, local GGUF, or the tiny random model) and check availability before a run.
- :mod:`~retrobench.inputs.tokenizers` — the byte-level tokenizer of the offline test model.
- :mod:`~retrobench.inputs.texts` — the standard library's docstrings as an offline long text.

Inputs import nothing of the run layer, the drivers or the report.
"""
