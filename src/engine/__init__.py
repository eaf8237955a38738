"""The fast path's engine (``train.fast_path=true``): flat batches, varlen attention, CUDA graphs, a memory budget.

A flat batch is a micro-batch's rows laid end to end in one row without padding, each example with its own
positions, and attention that never crosses from one example into another. :mod:`src.engine.trainer` builds the SFT
trainer on flat batches (its docstring says what changes and why learning does not); :mod:`src.engine.classification`
does the same for classifiers (decoders and BERT). The other modules are their parts: ``budget`` (micro-batches and
checkpointed layers), ``attention``, ``weights`` (bf16 and cached dequantized 4/8-bit weights), ``graphs`` (CUDA
graphs), ``sampler`` (token-balanced DDP ranks) and ``rows`` (tokenizing as TRL does).
The engine builds on the core modules (``plan``, ``data``, ``distributed``) and knows nothing of runs, packs or sweeps.
"""
