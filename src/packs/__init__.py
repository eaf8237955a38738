"""Trial packs: several LoRA trials of a sweep train at once on one frozen base (``hydra.sweeper.pack``).

``model`` (the pack: one base with one adapter per trial, each trial's tokens routed through its own adapter, one
joint step), ``trainer`` (each trial's own HF Trainer on the pack's step), ``runtime`` (the trials in threads of one
process, on a base loaded once). The sweeper groups jobs into packs (:mod:`src.sweeps.grouping`); a pack job runs them
(:func:`src.sweeps.job.run_pack_job`). Packs build on :mod:`src.fit` (each trial is one run), the engine and the core.
"""
