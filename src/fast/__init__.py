"""The fast SFT path (``train.fast_path=true``): packed rows, varlen attention, CUDA graphs, a memory budget.

:mod:`src.fast.trainer` builds the trainer (its docstring says what changes and why learning does not); the
other modules are its parts: ``budget`` (micro-batches and checkpointed layers), ``attention``, ``weights``
(bf16 and cached dequantized 4/8-bit weights), ``graphs`` (CUDA graphs), ``sampler`` (token-balanced DDP ranks)
and ``rows`` (tokenizing as TRL does); ``classification`` packs classifiers (decoders and BERT) on the same parts.
``bench`` measures it against the plain path (``python -m src.bench``; ``bench_classification`` the classifiers,
``bench_common`` what both share).
The fast path builds on the core modules (``plan``, ``data``, ``distributed``) and never imports the sweeps.
"""
