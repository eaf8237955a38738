"""Trial packs: several LoRA trials of a sweep train at once on one frozen base (``hydra.sweeper.pack``).

The trials of a pack share a base key (:func:`src.sweeps.grouping.base_key`: model, quantization, data, task, max
length, precision), so the process loads the base once and attaches one named peft adapter per trial, each with its
own r, alpha, dropout and targets. Every trial keeps its own HF ``Trainer`` (:class:`PackMemberTrainer`, a
:class:`src.engine.trainer.FlatTrainer`): its own data order and seed, learning rate and schedule, optimizer state,
evaluation, early stopping, pruning callback and MLflow run. The trainers run in threads of one process; what they
share is the step:

- each trainer hands its micro-batch (one padding-free flat row) to the :class:`Pack` instead of running it;
- once every live trial has handed one in, the pack concatenates the rows into one, runs the base model once over
  it with each trial's tokens routed through its own adapter (:func:`routed_lora_forward`: peft refuses
  mixed-adapter batches in training mode, so the routing is the project's), computes each trial's loss on its own
  tokens with the model's own loss function, and runs one backward over their sum;
- each trainer then clips, steps and schedules its own adapter. A trial's gradient is that of its own loss: the
  adapters are disjoint, and attention never crosses from one example (or trial) into another (varlen or
  per-example attention over the examples' bounds).

A trial that finishes, is pruned or fails leaves the pack (:meth:`Pack.leave`), and the rest go on; a NaN loss
stops its own trial (``train.stop_on_nonfinite_loss``). ``tests/unit/packs/test_packs.py`` checks that each trial of
a pack of 3 (different r, targets and learning rates) gives the losses and final adapter weights of the same trial
run alone.

Packs take SFT on the fast path with plain LoRA (no bias) on one process: :func:`src.sweeps.grouping.unpackable`
names what keeps a job out, and such jobs run alone.
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


@dataclass(frozen=True)
class Segment:
    """Tokens ``start:end`` of the row (dimension 1) go through ``adapter``; ``end`` None: to the end."""

    adapter: Optional[str]  # None: the base alone
    start: int = 0
    end: Optional[int] = None


class _Routing:
    route: tuple[Segment, ...] = ()


_ROUTING = _Routing()
# The route of the forward running now, and of its backward, whose checkpointed layers recompute the forward
# (on a GPU in autograd's own thread: so process-wide, not per thread). Every other forward waits for Pack.lock.


def routed_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward with its input's tokens routed to the adapters of :data:`_ROUTING`.

    As peft's own forward for one active adapter, ``base(x) + B(A(dropout(x))) * scaling``, each segment of the row
    through its own adapter's matmuls; a segment whose adapter does not target this layer adds nothing. The trials'
    weights never meet in one matmul: one trial's inf or NaN weights (a diverging learning rate) would turn the
    others' outputs or input gradients to NaN through ``0 * inf``, and a trial that fails must fail alone. Dropout
    runs once over the row where the adapters' rates agree (each token's mask is its own either way)."""
    result = self.base_layer(x, *args, **kwargs)
    route = _ROUTING.route
    present = [s.adapter for s in route if s.adapter is not None and s.adapter in self.lora_A]
    if not present:
        return result
    first = self.lora_A[present[0]].weight
    x = x.to(first.dtype)
    if len({getattr(self.lora_dropout[n], "p", 0.0) for n in present}) == 1:
        x = self.lora_dropout[present[0]](x)
        dropped = True
    else:
        dropped = False
    if len(route) == 1:
        name = present[0]
        delta = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return (result + delta).to(result.dtype)
    pieces = []
    for segment in route:
        name = segment.adapter
        part = x[:, segment.start : segment.end]
        if name is None or name not in self.lora_A:
            pieces.append(part.new_zeros((*part.shape[:-1], result.shape[-1])))
            continue
        if not dropped:
            part = self.lora_dropout[name](part)
        pieces.append(self.lora_B[name](self.lora_A[name](part)) * self.scaling[name])
    return (result + torch.cat(pieces, dim=1)).to(result.dtype)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's own LoRA weights (``...lora_A.<adapter>.weight``, ``...lora_B.<adapter>.weight``)."""
    marks = (f".lora_A.{adapter}.", f".lora_B.{adapter}.")
    return [(name, p) for name, p in model.named_parameters() if any(m in name for m in marks)]


class Pack:
    """The trials' shared base and their joint step. Its trials are named ``t0``, ``t1``, ... in order."""

    def __init__(self, model: torch.nn.Module, adapters: Sequence[str], seed: int):
        self.model = model  # a PeftModel holding every trial's adapter
        self.adapters = list(adapters)
        self.seed = seed
        self.lock = threading.Condition()
        self.live = set(self.adapters)
        self.pending: dict[str, tuple[Any, dict, Any]] = {}
        self.done: dict[str, Any] = {}
        self.steps = 0  # joint steps run
        self.trial_steps = 0  # trials' micro-batches run in them
        self.stopping: Optional[BaseException] = None
        self.estimate_gb: Optional[float] = None  # the pack's planned peak (prepare)
        self.started: Optional[float] = None
        self.joint_s = 0.0  # host time spent queuing the joint steps' forwards and backwards
        for layer in lora_layers(model):
            layer.forward = types.MethodType(routed_lora_forward, layer)
        for adapter in self.adapters:
            for _, param in adapter_parameters(model, adapter):
                param.requires_grad_(True)  # peft leaves only its active adapter trainable

    # ---- membership -------------------------------------------------------------------------------------------

    def leave(self, adapter: str) -> None:
        """The trial is done (finished, pruned or failed): the others step without it."""
        with self.lock:
            self.live.discard(adapter)
            self.pending.pop(adapter, None)
            self.lock.notify_all()
            if not self.live and self.started is not None:
                import time

                from src.logger import say

                wall = time.perf_counter() - self.started
                say(
                    f"pack: {self.steps} joint steps of {self.trial_steps / max(self.steps, 1):.2f} trials on average "
                    f"in {wall:.1f} s, {self.joint_s:.1f} s of it on the host queuing them"
                )
                self.started = None  # said once

    def stop(self, reason: BaseException) -> None:
        """Stop every trial at its next step (SIGTERM of the pack's process): each raises ``reason``."""
        with self.lock:
            self.stopping = reason
            self.lock.notify_all()

    # ---- forwards -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def routed(self, adapter: Optional[str]) -> Iterator[torch.nn.Module]:
        """The shared model with every token routed to ``adapter`` (None: the base alone), for one forward or
        generation; the other trials wait. Raises the pack's stop (SIGTERM) if one came."""
        with self.lock, _route((Segment(adapter),)):
            if self.stopping is not None:
                raise self.stopping
            yield self.model

    def forward_one(self, adapter: str, training: bool, inputs: dict[str, Any]):
        """One trial's own forward (an evaluation batch): the model in the trial's mode, its adapter only."""
        with self.routed(adapter) as model:
            if model.training != training:
                model.train(training)
            return model(**inputs)

    def step(self, adapter: str, trainer, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor:
        """Hand in the trial's micro-batch and wait for the joint step that runs it; its loss (detached).

        The step runs once every live trial has handed one in, in the thread of the last to arrive."""
        with self.lock:
            if self.stopping is not None:
                raise self.stopping
            if adapter not in self.live:  # it would wait for a step that never counts it
                raise RuntimeError(f"pack trial {adapter} stepped after it left the pack")
            self.pending[adapter] = (trainer, inputs, num_items_in_batch)
            while adapter not in self.done:
                if self.stopping is not None:
                    self.pending.pop(adapter, None)
                    raise self.stopping
                if self.pending and len(self.pending) == len(self.live):
                    batch, self.pending = self.pending, {}
                    self.done.update(self._run_step(batch))
                    self.lock.notify_all()
                else:
                    self.lock.wait()
            result = self.done.pop(adapter)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_step(self, batch: dict[str, tuple[Any, dict, Any]]) -> dict[str, Any]:
        """Each trial's loss of the joint step, or the exception its trial raises. Where the joint step fails (an
        out-of-memory error on one trial's long row, say), each trial's row runs again alone, so that only the trials
        whose own step fails fail (their gradients start from zero either way: none was accumulated)."""
        try:
            return self._joint_step(batch)
        except KeyboardInterrupt as exc:  # a stop: every trial of the step ends with it
            return dict.fromkeys(batch, exc)
        except Exception as first:  # noqa: BLE001  which trial's row it was is found below
            if len(batch) == 1:
                return dict.fromkeys(batch, first)
            del first  # its traceback holds the failed step's tensors
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results: dict[str, Any] = {}
        for name, entry in batch.items():
            for _, param in adapter_parameters(self.model, name):
                param.grad = None  # the failed joint backward may have written part of it
            try:
                results.update(self._joint_step({name: entry}))
            except Exception as exc:  # noqa: BLE001  this trial's own step fails
                results[name] = exc
        return results

    def _joint_step(self, batch: dict[str, tuple[Any, dict, Any]]) -> dict[str, torch.Tensor]:
        """Forward the trials' rows as one row, each trial's tokens through its adapter, and backward the sum of
        their losses (each the model's own loss over its tokens, normalized by its own token count)."""
        import time

        began = time.perf_counter()
        if self.steps == 0:
            torch.manual_seed(self.seed)  # the trials' setups ran in any order; their dropout starts here
            self.started = began
        names = [a for a in self.adapters if a in batch]
        segments, start = [], 0
        for name in names:
            length = batch[name][1]["input_ids"].shape[1]
            segments.append(Segment(name, start, start + length))
            start += length
        rows = [batch[name][1] for name in names]
        input_ids = torch.cat([r["input_ids"] for r in rows], dim=1)
        position_ids = torch.cat([r["position_ids"] for r in rows], dim=1)
        bounds = [0]  # every trial's examples' bounds, from the host (no device sync)
        for segment, row in zip(segments, rows):
            bounds += [segment.start + b for b in row["bounds"][1:]]
        first = batch[names[0]][0]
        extra = attention_inputs(first.attention, tuple(bounds), input_ids.device)
        model = self.model
        if not model.training:
            model.train()
        with _route(tuple(segments)):
            with first.compute_loss_context_manager():
                logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
            inner = model.get_base_model()
            losses = {}
            for segment in segments:
                trainer, inputs, count = batch[segment.adapter]
                loss = inner.loss_function(
                    logits[:, segment.start : segment.end],
                    inputs["labels"],
                    vocab_size=inner.config.vocab_size,
                    num_items_in_batch=count,
                )
                losses[segment.adapter] = loss
            torch.stack(list(losses.values())).sum().backward()
        self.steps += 1
        self.trial_steps += len(names)
        self.joint_s += time.perf_counter() - began
        return {name: loss.detach() for name, loss in losses.items()}

    # ---- outputs --------------------------------------------------------------------------------------------

    def save_adapter(self, adapter: str, directory: Path) -> None:
        """Save one trial's adapter as a run alone saves its own: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``directory`` (peft puts a named adapter in a subfolder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock, tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
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


@contextlib.contextmanager
def _route(route: tuple[Segment, ...]) -> Iterator[None]:
    previous, _ROUTING.route = _ROUTING.route, route
    try:
        yield
    finally:
        _ROUTING.route = previous


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
    """What one trial's Trainer holds as its model: the trial's adapter weights as its parameters (so its optimizer,
    gradient clipping and ``zero_grad`` see those alone), its forward the shared model's with its adapter."""

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


def build_pack(model: torch.nn.Module, loras: Sequence[Any], task: str, seeds: Sequence[int]) -> Pack:
    """Attach one adapter per trial (``t0``, ``t1``, ...) to the loaded base, each initialized as a run alone
    initializes its own (the global seed set to the trial's ``train.seed`` just before), and make the pack."""
    from peft import get_peft_model
    from transformers import set_seed

    from src.modeling import resolve_target_modules, to_lora_config

    names = [f"t{i}" for i in range(len(loras))]
    configs = [to_lora_config(lora, resolve_target_modules(model, lora), task) for lora in loras]  # on the bare base
    peft_model = None
    for name, config, seed in zip(names, configs, seeds):
        set_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return Pack(peft_model, names, seed=seeds[0])


def split_budget(budget: Optional[float], shared_gb: float, trials: int) -> Optional[float]:
    """Each trial's share of a pack's memory budget: the shared base once, the rest split evenly.

    A trial planned to ``shared + (budget - shared) / K`` leaves, summed over K trials less K-1 copies of the
    shared part, exactly ``budget``."""
    if budget is None:
        return None
    return shared_gb + max(0.0, budget - shared_gb) / trials


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


def prepare(pack: Pack, cfgs: Sequence[Any], bf16: bool) -> list[PackMember]:
    """Plan the pack's step and set up the shared base once: each trial's micro-batches within its share of the
    budget (:func:`split_budget`), checkpointing as many layers as the most needing trial, a 4/8-bit base's weights
    in bf16 under bf16 training, and its dequantized weights cached in the room the pack's estimate leaves."""
    from src.engine import budget as budget_mod
    from src.engine import weights
    from src.memory import pack_estimate_gb, plan

    model = pack.model
    first = cfgs[0]
    budget = budget_mod.resolve_budget(first.train.memory_budget_gb)
    estimate = None
    if budget is not None:
        fast = [replace_train(c, optim=budget_mod.fast_optimizer(c.train.optim)) for c in cfgs]
        breakdowns = [plan(c).est_mem_breakdown_gb for c in fast]
        share = split_budget(budget, max(b.shared for b in breakdowns), len(cfgs))
        micros = [budget_mod.plan_step_within(share, cfg, model) for cfg in cfgs]
        sized = [
            plan(replace_train(c, per_device_train_batch_size=m.micro_batch_size)).est_mem_breakdown_gb
            for c, m in zip(fast, micros)
        ]
        estimate = pack_estimate_gb(sized)
    else:
        micros = [budget_mod.plan_step_within(None, cfg, model) for cfg in cfgs]
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
