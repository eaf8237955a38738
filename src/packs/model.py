"""Trial packs: several LoRA trials of a sweep train at once on one frozen base (``hydra.sweeper.pack``).

The trials of a pack share a base key (:func:`src.sweeps.grouping.base_key`: model, quantization, data, task, max
length, precision), so the process loads the base once and attaches one named peft adapter per trial, each with its
own r, alpha, dropout and targets, initialized as a run alone initializes its own. Their weights then train in one
slot bank (:mod:`src.packs.engine`).

Each trial keeps its own HF ``Trainer`` (:class:`src.packs.trainer.PackMemberTrainer`) for what makes it its own
experiment: its data order and seed, learning-rate schedule, logging, evaluation, early stopping, pruning callback
and MLflow run. The trainers run in threads of one process, but none of them runs a kernel of training: the hot loop
is the :class:`Pack`'s, in one thread at a time:

- each trainer hands its micro-batch (one padding-free flat row) to the pack, with whether its optimizer steps after
  it and its settings (learning rate from its own schedule, betas, weight decay, clipping);
- once every live trial has handed one in, the pack lays the rows end to end, each padded to one length, runs the
  base once over them with each slot's tokens through its own adapter (two batched matmuls a LoRA layer for all
  slots), computes every trial's loss in one cross-entropy, runs one backward of their sum, and one AdamW step
  (:class:`src.packs.engine.SlotAdamW`) for the trials whose accumulation window ends;
- each trainer gets back its loss and gradient norm (device tensors: no host sync) and goes on with its own
  bookkeeping.

A trial that finishes, is pruned or fails leaves the pack (:meth:`Pack.leave`), and the rest go on; a NaN loss
stops its own trial (``train.stop_on_nonfinite_loss``). ``tests/unit/packs/test_packs.py`` checks that each trial of
a pack of 3 (different r, targets and learning rates) gives the losses and final adapter weights of the same trial
run alone.

Packs take SFT on the fast path with plain LoRA or rsLoRA (no bias, no DoRA, no LoRA+, a base the init leaves as it
is) on one process: :func:`src.sweeps.grouping.unpackable` names what keeps a job out, and such jobs run alone;
:func:`build_pack` refuses one that gets here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from src.packs import engine
from src.packs.graphs import JointGraphs

LENGTH_MULTIPLE = 64  # a joint step's rows on a GPU are padded up to a multiple of this many tokens


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's own weights in the peft model (``...lora_A.<adapter>.weight``, ..., and a classifier's head
    copy ``...modules_to_save.<adapter>.weight``): the copy a slot is loaded from and stored to
    (:class:`src.packs.engine.SlotBank`)."""
    marks = (f".lora_A.{adapter}.", f".lora_B.{adapter}.", f".modules_to_save.{adapter}.")
    return [(name, p) for name, p in model.named_parameters() if any(m in name for m in marks)]


class Pack:
    """The trials' shared base, their slot bank and optimizer, and their joint step. Its trials are named ``t0``,
    ``t1``, ... in order, and trial ``tI`` holds slot I of the bank (:mod:`src.packs.engine`)."""

    def __init__(self, model: torch.nn.Module, adapters: Sequence[str], seed: int, slots: Optional[int] = None):
        self.model = model  # a PeftModel holding every trial's adapter: where the bank's slots load from and save to
        self.adapters = list(adapters)
        self.seed = seed
        self.lock = threading.Condition()
        self.slot_of: dict[str, int] = {}  # the trials training now (joined, not yet left): the bank slot each holds
        self.trained: list[str] = []  # every trial that joined, in order
        # The trials that start together (the first slots' worth): the first joint step waits until each has joined
        # or ended, so that none trains its first steps alone while the others still set up (on an H100, a pack of
        # 4 that did not wait ran 157 joint steps of 1.63 trials where 64 of 4 were due).
        self.first_wave = min(slots or len(self.adapters), len(self.adapters))
        self.arrived = 0  # trials that joined or ended without joining
        self.ended_unjoined: set[str] = set()
        self.pending: dict[str, engine.Submission] = {}
        self.done: dict[str, Any] = {}
        self.steps = 0  # joint steps run
        self.trial_steps = 0  # trials' micro-batches run in them
        self.stopping: Optional[BaseException] = None
        self.estimate_gb: Optional[float] = None  # the pack's planned peak (prepare)
        self.started: Optional[float] = None
        self.joint_s = 0.0  # host time spent queuing the joint steps
        self.tokens = 0  # the trials' own tokens in the joint steps run
        self.padded_tokens = 0  # and the tokens those steps computed, each row padded to the step's one length
        self.pad_token_id = 0
        self.attention = "per-example"
        for _, param in model.named_parameters():
            param.requires_grad_(False)  # the bank holds what trains; peft's copies only load and save it
        self.bank = engine.SlotBank.for_adapters(model, self.adapters, slots=slots or len(self.adapters))
        self.optimizer = engine.SlotAdamW(self.bank)
        # rows are padded up to a multiple of this: on a GPU, fewer distinct shapes for its kernels and allocator
        self.length_multiple = LENGTH_MULTIPLE if self.bank.weights.is_cuda else 1
        for layer in engine.lora_layers(model):
            layer.forward = types.MethodType(engine.bank_lora_forward, layer)
        for wrapper in engine.head_wrappers(model):
            wrapper.forward = types.MethodType(engine.bank_head_forward, wrapper)
        self.task = "sft"  # or a classifier's (src.packs.trainer sets it, with its class weights)
        self.graphs: Optional[JointGraphs] = None  # where the SFT joint steps replay as CUDA graphs (src.packs.trainer)
        self.graphs_asked = False  # every trial's train.pack_cuda_graphs (prepare)
        self.label_weights: Optional[torch.Tensor] = None

    def slot(self, adapter: str) -> int:
        return self.slot_of[adapter]

    # ---- membership -------------------------------------------------------------------------------------------

    def join(self, adapter: str) -> None:
        """The trial starts training: it takes a free slot of the bank (its adapter's weights loaded, its optimizer
        state fresh), and the joint steps wait for its micro-batches from now on."""
        with self.lock:
            if self.stopping is not None:
                raise self.stopping
            free = sorted(set(range(self.bank.slots)) - set(self.slot_of.values()))
            if not free:
                raise RuntimeError(f"pack trial {adapter}: all {self.bank.slots} slots are taken")
            slot = self.slot_of[adapter] = free[0]
            self.bank.load(slot, adapter)
            self.optimizer.reset(slot)
            self.trained.append(adapter)
            self.arrived += 1
            self.lock.notify_all()

    def leave(self, adapter: str) -> None:
        """The trial is done training (finished, pruned or failed): its weights go back to its peft adapter (where
        its final evaluation, samples and save read them), its slot is free, and the others step without it."""
        with self.lock:
            self.pending.pop(adapter, None)
            slot = self.slot_of.pop(adapter, None)
            if slot is not None:
                self.bank.store(slot)
            if adapter not in self.trained and adapter not in self.ended_unjoined:  # it ended before it trained
                self.ended_unjoined.add(adapter)
                self.arrived += 1
            self.lock.notify_all()

    def summary(self) -> str:
        """What the pack did (:meth:`stats`) in one line: trials trained, joint steps, the host's share."""
        stats = self.stats()
        return (
            f"pack: trained {stats['trained']} trial(s) in {stats['slots']} slot(s) on one base; "
            f"{stats['joint_steps']} joint steps of {stats['trials_per_step']:.2f} trials on average in "
            f"{stats['wall_s']:.1f} s, {stats['host_s']:.1f} s of it on the host queuing them; "
            f"{stats['padding_share']:.1%} of their tokens padding"
            + ("" if stats["cuda_graphs"] is None else f"; {stats['cuda_graphs']}")
        )

    def stats(self) -> dict[str, Any]:
        """What the pack did, as numbers (the sweep prints them and logs them on its parent run): trials trained,
        slots, joint steps, trials per joint step, wall and host seconds, the padding's share of the tokens."""
        import time

        wall = 0.0 if self.started is None else time.perf_counter() - self.started
        return {
            "trained": len(self.trained),
            "slots": self.bank.slots,
            "joint_steps": self.steps,
            "trials_per_step": round(self.trial_steps / max(self.steps, 1), 3),
            "wall_s": round(wall, 2),
            "host_s": round(self.joint_s, 2),
            "padding_share": round(self.padding_share(), 4),
            "cuda_graphs": None if self.graphs is None else self.graphs.summary(),
        }

    def padding_share(self) -> float:
        """The share of the joint steps' tokens that were padding: each slot's row is padded to the step's longest
        (and on a GPU up to a multiple of 64 tokens, or 256 while graphs run). Trials of one seed and data draw
        rows of the same lengths step by step; trials whose rows differ pay for the longest."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def stop(self, reason: BaseException) -> None:
        """Stop every trial at its next step (SIGTERM of the pack's process): each raises ``reason``."""
        with self.lock:
            self.stopping = reason
            self.lock.notify_all()

    # ---- forwards -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def routed(self, adapter: Optional[str]) -> Iterator[torch.nn.Module]:
        """The shared model running ``adapter``'s slot alone (None: the base alone), for one forward or
        generation; the other trials wait. Raises the pack's stop (SIGTERM) if one came."""
        with self.lock, engine.active(engine.OneSlot(self.bank, self.slot_of.get(adapter), adapter)):
            if self.stopping is not None:
                raise self.stopping
            yield self.model

    def forward_one(self, adapter: str, training: bool, inputs: dict[str, Any]):
        """One trial's own forward (an evaluation batch): the model in the trial's mode, its slot only."""
        with self.routed(adapter) as model:
            if model.training != training:
                model.train(training)
            return model(**inputs)

    def step(self, adapter: str, submission: engine.Submission):
        """Hand in the trial's micro-batch and wait for the joint step that runs it: its (loss, gradient norm),
        both on the device; the norm is None unless the trial's optimizer stepped.

        The step runs once every live trial has handed one in, in the thread of the last to arrive."""
        with self.lock:
            if self.stopping is not None:
                raise self.stopping
            if adapter not in self.slot_of:  # it would wait for a step that never counts it
                raise RuntimeError(f"pack trial {adapter} stepped after it left the pack")
            self.pending[adapter] = submission
            while adapter not in self.done:
                if self.stopping is not None:
                    self.pending.pop(adapter, None)
                    raise self.stopping
                if self.pending and len(self.pending) == len(self.slot_of) and self.arrived >= self.first_wave:
                    batch, self.pending = self.pending, {}
                    self.done.update(self._run_step(batch))
                    self.lock.notify_all()
                else:
                    self.lock.wait()
            result = self.done.pop(adapter)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_step(self, batch: dict[str, engine.Submission]) -> dict[str, Any]:
        """Each trial's (loss, norm) of the joint step, or the exception its trial raises. Where the joint step fails
        (an out-of-memory error on one trial's long row, say), each trial's row runs again alone, so that only the
        trials whose own step fails fail (their gradients of this window start again from zero)."""
        try:
            return self._joint_step(batch)
        except KeyboardInterrupt as exc:  # a stop: every trial of the step ends with it
            return dict.fromkeys(batch, exc)
        except Exception as first:  # noqa: BLE001  which trial's row it was is found below
            if isinstance(first, torch.OutOfMemoryError) and self.graphs is not None and self.graphs.running:
                # the graphs' pool keeps its memory: without it, the rows below (and the steps after) may fit
                self.graphs.release(first)
            if len(batch) == 1:
                return dict.fromkeys(batch, first)
            del first  # its traceback holds the failed step's tensors
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        grad = self.bank.weights.grad
        results: dict[str, Any] = {}
        for name, entry in batch.items():
            if grad is not None:
                with torch.no_grad():
                    grad[self.slot(name)].zero_()  # the failed joint backward may have written part of it
            try:
                results.update(self._joint_step({name: entry}))
            except Exception as exc:  # noqa: BLE001  this trial's own step fails
                results[name] = exc
        return results

    def _joint_step(
        self, batch: dict[str, engine.Submission]
    ) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """One forward over the trials' rows laid end to end (each slot's tokens through its own adapter), one
        backward of the sum of their losses, and one optimizer step for the trials whose window ends here."""
        import time

        began = time.perf_counter()
        if self.steps == 0:
            torch.manual_seed(self.seed)  # the trials' setups ran in any order; their dropout starts here
            self.started = began
        names = sorted(batch, key=self.slot)
        rows = [batch[name].row for name in names]
        graphed = self.graphs is not None and self.graphs.running
        # while graphs run, the run-alone graphs' coarser buckets: fewer shapes to capture, and less pool to hold them
        length = engine.padded_length(rows, self.graphs.bucket if graphed else self.length_multiple)
        if not self.model.training:
            self.model.train()
        device = self.bank.weights.device
        counts = torch.stack([torch.as_tensor(r.count, device=device).float() for r in rows])
        losses = self._forward_backward(rows, length, counts, batch[names[0]].autocast)
        norms = self._optimizer_step(batch)
        self.steps += 1
        self.trial_steps += len(names)
        self.tokens += sum(r.input_ids.shape[1] for r in rows)
        self.padded_tokens += len(rows) * length
        self.joint_s += time.perf_counter() - began
        return {
            name: (losses[i], norms[self.slot(name)] if batch[name].stepping else None) for i, name in enumerate(names)
        }

    def _forward_backward(self, rows: list[engine.SlotRow], length: int, counts: torch.Tensor, autocast):
        """One forward over all rows, each slot's tokens through its adapter (and, for a classifier, its examples
        through its own head), and one backward of the sum of the slots' losses, inside the step's context (a
        checkpointed layer recomputes its forward, adapters included, during the backward). Each row's slot's loss,
        detached."""
        device = self.bank.weights.device
        slots = [r.slot for r in rows]
        if self.task == "sft":
            losses = None if self.graphs is None else self.graphs.step(rows, length, counts, autocast)
            if losses is not None:
                return losses
            joint = engine.joint_inputs(rows, length, self.pad_token_id)
            extra = attention_inputs(self.attention, joint["bounds"], device)
            ids, positions = (joint[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids"))
            with engine.active(engine.joint_step(self.bank, slots, length)):
                with autocast():
                    logits = self.model(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits
                losses = engine.slot_losses(logits, joint["shift_labels"], counts)
                losses.sum().backward()
            return losses.detach()
        from src.engine.classification import flat_logits

        if self.label_weights is not None and self.label_weights.device != device:
            self.label_weights = self.label_weights.to(device)  # once: a host copy every step would wait for the GPU
        joint = engine.joint_classification_inputs(rows, length)
        keys = ("input_ids", "position_ids", "last_token")
        ids, positions, last = (joint[k].to(device, non_blocking=True) for k in keys)
        with engine.active(engine.joint_step(self.bank, slots, length, joint["examples"])):
            with autocast():
                logits = flat_logits(
                    self.model, ids, positions, last, self.attention, joint["bounds"], joint["first_token"]
                )
            multilabel = self.task == "multilabel"
            losses = engine.slot_classification_losses(
                logits, joint["labels"], joint["examples"], self.label_weights, multilabel, counts
            )
            losses.sum().backward()
        return losses.detach()

    def _optimizer_step(self, batch: dict[str, engine.Submission]) -> torch.Tensor:
        """The optimizer step of every trial of ``batch`` whose accumulation window ends; each slot's norm."""
        slots = self.bank.slots
        stepping = torch.zeros(slots, 1, dtype=torch.bool)
        hyper = torch.zeros(slots, 6)
        for name, submission in batch.items():
            if submission.stepping:
                stepping[self.slot(name)] = True
                hyper[self.slot(name)] = torch.tensor(submission.hyper)
        device = self.bank.weights.device
        if not bool(stepping.any()):
            return torch.zeros(slots, device=device)
        return self.optimizer.step(stepping.to(device, non_blocking=True), hyper.to(device, non_blocking=True))

    # ---- outputs --------------------------------------------------------------------------------------------

    def save_adapter(self, adapter: str, directory: Path) -> None:
        """Save one trial's adapter as a run alone saves its own: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``directory`` (peft puts a named adapter in a subfolder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock, tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            if adapter in self.slot_of:  # a checkpoint while it trains: its weights are in the bank
                self.bank.store(self.slot(adapter))
            self.model.save_pretrained(tmp, selected_adapters=[adapter])
            saved = Path(tmp) / adapter
            for item in [*saved.iterdir(), *(p for p in Path(tmp).iterdir() if p.is_file())]:  # peft's model card
                shutil.move(str(item), str(directory / item.name))
        config_file = directory / "adapter_config.json"
        if config_file.is_file():  # the config names its base like a run alone's
            import json

            conf = json.loads(config_file.read_text())
            conf.pop("adapter_name", None)
            config_file.write_text(json.dumps(conf, indent=2, sort_keys=True))

    def counts(self, adapter: str) -> tuple[int, int]:
        """(trainable, total) parameters of one trial: its adapter, and the base plus its adapter."""
        from src.modeling import count_params

        trainable = sum(p.numel() for _, p in adapter_parameters(self.model, adapter))
        _, everything = count_params(self.model)
        others = sum(p.numel() for a in self.adapters if a != adapter for _, p in adapter_parameters(self.model, a))
        return trainable, everything - others

    def targets(self, adapter: str) -> list[str]:
        """Sorted leaf names of the layers the trial's adapter targets."""
        return sorted({n.split(".")[-1] for n, m in self.model.named_modules() if adapter in getattr(m, "lora_A", {})})


def attention_inputs(attention: str, bounds: tuple[int, ...], device) -> dict[str, Any]:
    """The packed-attention inputs of a row whose examples start at ``bounds`` (and end at its last), as
    :meth:`FlatTrainer.compute_loss` passes them; the offsets reach the GPU without waiting for it."""
    if attention == "mask":
        return {}
    if attention == "varlen":
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        return {
            "flat_cu_seqlens": torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
            "flat_max_seqlen": max(lengths),
        }
    return {"flat_seq_bounds": bounds}


class TrialModel(torch.nn.Module):
    """What one trial's Trainer holds as its model: its forward is the shared model's with the trial's slot alone,
    and its parameters peft's copy of the trial's adapter (frozen: the bank trains; the Trainer's optimizer and
    clipping are the pack's, :class:`src.packs.trainer.PackMemberTrainer`)."""

    def __init__(self, pack: Pack, adapter: str):
        super().__init__()
        for name, param in adapter_parameters(pack.model, adapter):
            # Real names (dots made legal): the Trainer's weight-decay groups read names ("bias", norms).
            self.register_parameter(name.replace(".", "__"), param)
        object.__setattr__(self, "pack", pack)  # not a submodule: its parameters are not this trial's
        self.adapter = adapter
        self.config = pack.model.get_base_model().config

    def forward(self, **inputs):
        return self.pack.forward_one(self.adapter, self.training, inputs)

    def save_pretrained(self, directory, **kwargs) -> None:
        self.pack.save_adapter(self.adapter, Path(directory))


def build_pack(
    model: torch.nn.Module, loras: Sequence[Any], task: str, seeds: Sequence[int], slots: Optional[int] = None
) -> Pack:
    """Attach one adapter per trial (``t0``, ``t1``, ...) to the loaded base, each initialized as a run alone
    initializes its own (the global seed set to the trial's ``train.seed`` just before; a classifier's head drawn
    anew from it first, as loading the base draws it for a run alone, and copied into the trial's adapter), and make
    the pack: a bank of ``slots`` (None: one a trial) in which the trials train, at most ``slots`` at once."""
    from peft import get_peft_model
    from transformers import set_seed

    from src.config import ConfigError
    from src.config_schema import unshareable_variant
    from src.modeling import resolve_target_modules, to_lora_config

    refused = [f"trial {i}: {why}" for i, why in enumerate(map(unshareable_variant, loras)) if why is not None]
    if refused:  # the sweep's grouping runs such jobs alone; a pack that gets one would train it wrong
        raise ConfigError(refused)
    names = [f"t{i}" for i in range(len(loras))]
    configs = [to_lora_config(lora, resolve_target_modules(model, lora), task) for lora in loras]  # on the bare base
    peft_model = None
    for name, config, seed in zip(names, configs, seeds):
        set_seed(seed)
        if task != "sft":
            _draw_head(model)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return Pack(peft_model, names, seed=seeds[0], slots=slots)


@torch.no_grad()
def _draw_head(classifier: torch.nn.Module) -> None:
    """Initialize the classifier's head as ``from_pretrained`` initializes a head the checkpoint lacks (the model's
    own ``_init_weights``), from the global RNG as it is now; under peft, the head it wraps."""
    from src.engine.classification import classifier_parts
    from src.modeling import base_model

    _, head = classifier_parts(classifier)
    base_model(classifier)._init_weights(getattr(head, "original_module", head))


def replace_train(cfg, **changes):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


@dataclass
class PackMember:
    """One trial of a pack, as its run sees it: the pack, its adapter, its step plan (set by :func:`prepare`)."""

    pack: Pack
    adapter: str
    model: TrialModel
    micro: Any = None  # src.engine.budget.MicroBatchPlan
    attention: str = "auto"

    def build_trainer(self, cfg, tokenizer, args, train_dataset, eval_dataset, callbacks):
        """This trial's trainer and plan (:func:`src.packs.trainer.build_pack_member_trainer`)."""
        from src.packs.trainer import build_pack_member_trainer

        return build_pack_member_trainer(cfg, tokenizer, args, train_dataset, eval_dataset, callbacks, self)

    def build_classifier_trainer(self, data, args, common: dict):
        """This trial's classifier trainer and plan (:func:`src.packs.trainer.build_pack_classifier_trainer`)."""
        from src.packs.trainer import build_pack_classifier_trainer

        return build_pack_classifier_trainer(data, args, common, self)


def plan_pack_step(cfgs: Sequence[Any], model: torch.nn.Module, budget: Optional[float], slots: Optional[int] = None):
    """The micro-batch plan of every trial of a pack, and what it says: one micro-batch size for all trials (so
    their rows are alike in length and the joint step pads little), the largest that fits the budget with all
    trials' activations and no layer checkpointed; checkpointing only where even one example a trial does not fit
    (memory forces it). Returns (plans, note)."""
    import math

    from src.engine import budget as budget_mod
    from src.memory import pack_estimate_gb, plan_in_pack

    steps = [c.train.per_device_train_batch_size * c.train.gradient_accumulation_steps for c in cfgs]
    held = min(slots or len(cfgs), len(cfgs))
    if budget is None:
        note = f"pack of {len(cfgs)} trial(s) in {held} slot(s): no memory budget (no GPU)"
        return [budget_mod.plan_step_within(None, c, model) for c in cfgs], note
    common = math.gcd(*steps)
    fast = [replace_train(c, optim=budget_mod.fast_optimizer(c.train.optim)) for c in cfgs]

    def estimate(size: int, ckpt: bool) -> float:
        sized = [replace_train(c, per_device_train_batch_size=size, activation_checkpointing=ckpt) for c in fast]
        return pack_estimate_gb([plan_in_pack(c).est_mem_breakdown_gb for c in sized], slots)

    layers = len(budget_mod.decoder_layers(model))
    common_plan = _largest_without_checkpointing(common, layers, budget, estimate)
    if common_plan is None:  # even one example a trial needs checkpointing: as few layers as fit
        common_plan = budget_mod.plan_micro_batches(common, layers, budget, estimate)
    size, ckpt = common_plan.micro_batch_size, common_plan.checkpointed_layers
    plans = [
        dataclasses.replace(common_plan, examples_per_step=n, gradient_accumulation_steps=n // size) for n in steps
    ]
    note = (
        f"pack of {len(cfgs)} trial(s) in {held} slot(s): micro-batches of {size} "
        f"example(s) a trial, est. peak {common_plan.est_peak_gpu_mem_gb:.1f} GiB"
    )
    if ckpt:
        note += (
            f"; activation checkpointing on {ckpt}/{layers} layers: even one example a trial needs "
            f"{estimate(1, False):.1f} GiB without it, over the {budget:.1f} GiB planned"
        )
    return plans, note


def _largest_without_checkpointing(common: int, layers: int, budget: float, estimate):
    """The largest micro-batch size (a divisor of ``common``, so every window holds the same examples) whose
    estimate fits ``budget`` with no layer checkpointed; None where not even one example does. A smaller micro-batch
    over more accumulation steps keeps the joint step whole and leaves room to cache dequantized weights, where the
    run-alone planner (:func:`src.engine.budget.plan_micro_batches`) would keep the size and checkpoint layers."""
    from src.engine.budget import MicroBatchPlan

    for size in sorted((d for d in range(1, common + 1) if common % d == 0), reverse=True):
        full = estimate(size, False)
        if full <= budget:
            return MicroBatchPlan(common, size, common // size, 0, layers, budget, full)
    return None


def prepare(pack: Pack, cfgs: Sequence[Any], bf16: bool, slots: Optional[int] = None) -> list[PackMember]:
    """Plan the pack's step (:func:`plan_pack_step`) and set up the shared base once: checkpointing where the plan
    needs it, a 4/8-bit base's weights in bf16 under bf16 training, and its dequantized weights cached in the room
    the pack's estimate leaves."""
    from src.engine import budget as budget_mod
    from src.engine import weights
    from src.logger import say

    model = pack.model
    first = cfgs[0]
    budget = budget_mod.resolve_budget(first.train.memory_budget_gb)
    micros, note = plan_pack_step(cfgs, model, budget, slots)
    say(note)
    estimate = micros[0].est_peak_gpu_mem_gb
    checkpointed = max(m.checkpointed_layers for m in micros)
    budget_mod.set_checkpointed_layers(model, checkpointed)
    cached, cache_gb = weights.prepare_frozen_weights(
        model,
        first.quant.bits,
        bf16=bf16,
        dequantize=first.train.dequantize_weights and budget is not None,
        room_gb=None if budget is None else max(0.0, budget - (estimate or 0.0)),
        int8_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    pack.estimate_gb = None if estimate is None else estimate + cache_gb
    pack.graphs_asked = all(c.train.pack_cuda_graphs for c in cfgs)  # one joint step: all its trials ask, or none
    if bf16:  # the base now computes in bf16: so do the adapters (the bank keeps fp32 master weights)
        pack.bank.compute_dtype = torch.bfloat16
    members = []
    for adapter, micro in zip(pack.adapters, micros):
        micro = dataclasses.replace(
            micro,
            checkpointed_layers=checkpointed,
            dequantized_layers=cached,
            dequantized_gb=cache_gb,
            est_peak_gpu_mem_gb=pack.estimate_gb,
        )
        members.append(PackMember(pack, adapter, TrialModel(pack, adapter), micro))
    return members
