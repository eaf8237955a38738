"""The trial-pack runtime: the trials of a pack train in threads of one process, on one base loaded once.

:func:`trial_functions` turns a pack's jobs into one training function per trial (:func:`src.fit.run` on a
:class:`PackSlot`) and their :class:`SharedBase`; :mod:`src.sweeps.job` runs them (``hydra.sweeper.pack``).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from src.config import Config
from src.data import load_data
from src.fit import check_label_metrics, run


@dataclass
class SharedBase:
    """What the trials of a pack share: the tokenizer, the data and the base with every trial's adapter, loaded
    once, by the first trial to ask (after its MLflow run has started: a base that fails to load fails every
    trial's run with the reason)."""

    cfgs: list[Config]
    slots: Optional[int] = None  # trials training at once (the pack's size); None: all
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: Optional[tuple[Any, Any, list]] = None
    error: Optional[BaseException] = None
    pack: Any = None
    stopping: Optional[BaseException] = None
    ended_early: set = field(default_factory=set)  # trials that ended before the pack existed

    def load(self, index: int):
        """Trial ``index``'s tokenizer, the data and its :class:`src.packs.model.PackMember`; the first call loads."""
        with self.lock:
            if self.error is not None:
                raise self.error
            if self.stopping is not None:
                raise self.stopping
            if self.loaded is None:
                try:
                    self.loaded = self._load_base()
                except BaseException as exc:
                    self.error = exc
                    raise
            if self.stopping is not None:  # a stop (SIGTERM) came while the base loaded
                raise self.stopping
        tokenizers, data, members = self.loaded
        return tokenizers[index], data, members[index]

    def _load_base(self) -> tuple[list, Any, list]:
        from transformers import set_seed

        from src import modeling
        from src.packs import model as pack_model

        cfgs, cfg = self.cfgs, self.cfgs[0]
        tokenizer = modeling.load_tokenizer(cfg.model)
        data = load_data(cfg.data, tokenizer, cfg.model.max_length)
        for job in cfgs:
            check_label_metrics(job, data.labels)
        set_seed(cfg.train.seed)
        model = modeling.load_model(cfg.model, cfg.quant, data.task, data.labels, tokenizer.pad_token_id, False)
        loras, seeds = [c.lora for c in cfgs], [c.train.seed for c in cfgs]
        slots = min(self.slots or len(cfgs), len(cfgs))
        self.pack = pack_model.build_pack(model, loras, data.task, seeds, slots=slots)
        for index in self.ended_early:  # the first joint step does not wait for them
            self.pack.leave(self.pack.adapters[index])
        members = pack_model.prepare(self.pack, cfgs, bf16=bool(cfg.train.bf16), slots=slots)
        # One tokenizer each: a fast tokenizer's padding and truncation are state that every call sets, so one
        # trial's generate (padding=True) would race another's tokenize_sft (no padding).
        tokenizers = [tokenizer, *(copy.deepcopy(tokenizer) for _ in cfgs[1:])]
        return tokenizers, data, members

    def stop(self, reason: BaseException) -> None:
        """Stop every trial: at its next step, or before it starts (:meth:`load`). Called from a signal handler,
        so it does not wait for the lock a loading trial holds (``load`` reads ``stopping`` after ``pack`` is set)."""
        self.stopping = reason
        if self.pack is not None:
            self.pack.stop(reason)

    def leave(self, index: int) -> None:
        """A trial's thread is done, however it ended: its slot is free (if it held one), and the first joint step
        waits for it no more (told to the pack once it exists, if it ended before)."""
        with self.lock:  # the pack is made under this lock: an early end is either recorded here or told to it
            pack = self.pack
            if pack is None:
                self.ended_early.add(index)
                return
        pack.leave(pack.adapters[index])

    def summary(self) -> Optional[str]:
        """What the pack did (:meth:`src.packs.model.Pack.summary`); None if it never loaded."""
        return None if self.pack is None else self.pack.summary()

    def stats(self) -> Optional[dict[str, Any]]:
        """The same as numbers (:meth:`src.packs.model.Pack.stats`); None if the base never loaded."""
        return None if self.pack is None else self.pack.stats()


@dataclass
class PackSlot:
    """One trial's place in a pack: the shared base, its index, and its own environment (an Optuna trial's)."""

    shared: SharedBase
    index: int
    env: Optional[dict[str, str]] = None

    def tags(self) -> dict[str, str]:
        slots = self.shared.slots or len(self.shared.cfgs)
        return {"pack_size": str(min(slots, len(self.shared.cfgs))), "pack_trial": f"t{self.index}"}


def trial_functions(jobs: list[tuple[Config, Optional[dict]]], slots: Optional[int] = None):
    """The trials of a pack (config, environment), as one training function each (``train(cfg)``, to run each
    in its own thread, at most ``slots`` at once) and their shared base (``stop``, ``leave``, ``slots``)."""
    import functools

    # Imported here, once: the trials' threads would race through transformers' and TRL's lazy modules, which
    # are not thread-safe ("cannot import name 'SFTConfig' from 'trl'").
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import PartialState
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: F401

    from src import guards, modeling, training  # noqa: F401
    from src.engine import trainer as fast_trainer  # noqa: F401
    from src.packs import model as pack_model  # noqa: F401

    PartialState()  # accelerate's process state, made once: the trials' trainers then share it (shared_state)

    shared = SharedBase([cfg for cfg, _ in jobs], slots)
    trains = [functools.partial(run, slot=PackSlot(shared, i, env)) for i, (_, env) in enumerate(jobs)]
    return trains, shared
