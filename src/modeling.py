"""Config to library objects: quantization, tokenizer, base model, LoRA targets and adapters.

The converters are small pure functions (``to_bnb_config``, ``to_lora_config``,
``resolve_target_modules``) so each is unit-tested on its own. LoRA presets are resolved on
the loaded model, from the names of the linear layers inside its numbered transformer
blocks, so one preset works for Llama/Mistral, Phi-3's fused projections and BERT alike.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from src.config import (
    FULL_FINE_TUNING,
    LORA_PRESETS,
    ConfigError,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    changes_base,
)
from src.errors import first_line
from src.guards import check_remote_code, check_weight_format
from src.hub import ModelUnavailable, looks_local, model_source_problem
from src.tiny import resolve_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Leaf names of attention projections across architectures (Llama/Mistral, BERT, DistilBERT, Phi-3, GPT-NeoX...).
Q_NAMES = {"q_proj", "query", "q_lin", "wq"}
K_NAMES = {"k_proj", "key", "k_lin", "wk"}
V_NAMES = {"v_proj", "value", "v_lin", "wv"}
FUSED_QKV_NAMES = {"qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "in_proj"}
ATTENTION_PARENTS = {"self_attn", "attention", "attn", "self_attention", "mixer"}
OUTPUT_HEADS = {"lm_head", "score", "classifier", "qa_outputs", "cls"}
CLASSIFIER_HEADS = {"score", "classifier"}  # AutoModelForSequenceClassification's heads (decoders, encoders)
# Encoders whose classifier trains on flat rows (src.engine.classification): BERT's pooling and head are known there.
FLAT_ENCODER_TYPES = {"bert"}
_BLOCK = re.compile(r"^(?:.*\.)?\d+\.(.+)$")


def unquantized_heads(task: str) -> Optional[list[str]]:
    """The modules a classifier keeps out of 4/8-bit quantization: its head, which trains; None for a causal LM,
    whose head transformers finds itself (the output embeddings).

    transformers finds a classifier's head by its last parameter's name (``get_keys_to_not_convert``): BERT's ends
    in ``classifier.bias``, which names no module, so the head was quantized, and a 4-bit head cannot train."""
    return None if task == "sft" else sorted(CLASSIFIER_HEADS)


def to_bnb_config(quant: QuantConfig, task: str = "sft"):
    """The BitsAndBytesConfig for 4- or 8-bit bases; None for a 16-bit or an FP8 base (:mod:`src.fp8`)."""
    if quant.bits == 16 or quant.fp8:
        return None
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": unquantized_heads(task)}
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        **skip,
    )


@contextlib.contextmanager
def loading_from(name_or_path: str) -> Iterator[None]:
    """transformers says a model cannot be found or read with OSError; that is the config's to fix, in one line."""
    try:
        yield
    except OSError as exc:
        if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
            problem = "no such directory"
        else:
            problem = f"cannot be loaded ({first_line(exc)})"
        raise ModelUnavailable(
            f"model.name_or_path={name_or_path!r}: {problem}; give a local model directory or a hub id this "
            "machine can download (with model.revision)"
        ) from exc


def require_model_source(model_cfg: ModelConfig) -> None:
    """Raise :class:`ModelUnavailable` in seconds for a hub model that is not cached and cannot be downloaded now."""
    problem = model_source_problem(model_cfg.name_or_path, model_cfg.revision, may_download=True)
    if problem and looks_local(model_cfg.name_or_path):
        raise ModelUnavailable(f"{problem}; give a local model directory or a hub id this machine can download")
    if problem:
        raise ModelUnavailable(
            f"{problem}; connect to the hub, or save the model on a machine that can and pass "
            "model.name_or_path=/path/to/dir"
        )


def load_tokenizer(model_cfg: ModelConfig):
    """Load the tokenizer; give it a pad token (eos, as Llama recipes do) if it has none."""
    from transformers import AutoTokenizer

    require_model_source(model_cfg)
    check_remote_code(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
    with loading_from(model_cfg.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_builtin(model_cfg.name_or_path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer of {model_cfg.name_or_path} has no pad, eos or unk token to pad with")
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    task: str,
    labels: Optional[list[str]],
    pad_token_id: int,
    activation_checkpointing: bool = False,
    training: bool = True,
):
    """Load the base model for the task, quantized as configured, ready for adapters (``training``: to train them,
    which keeps 4-bit weights where gradients pass, see :func:`keep_4bit_weights_differentiable`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    require_model_source(model_cfg)
    check_remote_code(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
    check_weight_format(model_cfg.name_or_path, model_cfg.allow_pickle_weights)
    kwargs: dict[str, Any] = {
        "use_safetensors": None if model_cfg.allow_pickle_weights else True,  # a hub repo too: never a pickle
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": DTYPES[model_cfg.dtype],
        "quantization_config": to_bnb_config(quant, task),
    }
    device = None
    if torch.cuda.is_available():
        # Under torchrun each rank loads onto its own GPU; the Trainer's DDP then uses that one.
        device = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch.cuda.set_device(device)
        if not quant.fp8:  # an FP8 base loads on the CPU and goes to the GPU a layer at a time (convert_to_fp8)
            kwargs["device_map"] = {"": device}
    if quant.fp8:
        from src.fp8 import fp8_unavailable

        if (reason := fp8_unavailable(probe=True)) is not None:  # on this rank's GPU, before the weights load
            raise ConfigError([f"quant=fp8: {reason}"])
    path = resolve_builtin(model_cfg.name_or_path)
    with loading_from(model_cfg.name_or_path):
        if task == "sft":
            model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        else:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                problem_type="multi_label_classification" if task == "multilabel" else "single_label_classification",
                output_loading_info=True,
                **kwargs,
            )
    warn_unexpected_loading(path, loading)
    # Decoder classifiers pool the last non-pad token: the config must know the pad id.
    model.config.pad_token_id = pad_token_id
    if quant.fp8:  # loaded at model.dtype; its linear layers (not the heads) now hold FP8 weights, frozen
        from src.fp8 import convert_to_fp8

        convert_to_fp8(model, unquantized_heads(task), device)
    elif quant.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        # peft's own checkpointing calls transformers' deprecated gradient_checkpointing_enable (a FutureWarning)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if training:
            keep_4bit_weights_differentiable(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass, with inputs that carry gradients (the
    frozen embeddings would cut the LoRA layers' gradient off otherwise). Non-reentrant: torch's recommended kind."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a ``Linear4bit``'s first forward in eval mode without grad (the first evaluation)
    repacks its weight for good into a layout whose kernel (``gemv_4bit``) has no backward: every later training
    step then backpropagates as if the base weights were zero, silently (only the residual stream and the adapters
    pass gradient down), and the adapters below the top layer learn from a wrong gradient.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def unexpected_loading(loading: dict[str, Any]) -> list[str]:
    """The weights that did not load and are not a new output head: a checkpoint that does not fit the model.

    A classifier made from a language model drops its LM head and starts a new ``score``/``classifier`` head by
    design (transformers' load report lists both); anything else missing, unused or of the wrong shape is a fault
    worth seeing."""

    def head(key: str) -> bool:
        return any(part in OUTPUT_HEADS for part in key.split(".")[:2])

    faults = [f"missing {k}" for k in loading.get("missing_keys", ()) if not head(k)]
    faults += [f"unused {k}" for k in loading.get("unexpected_keys", ()) if not head(k)]
    faults += [f"mismatched {k[0] if isinstance(k, tuple) else k}" for k in loading.get("mismatched_keys", ())]
    return faults


def warn_unexpected_loading(path: str, loading: dict[str, Any]) -> None:
    import logging

    faults = unexpected_loading(loading)
    if faults:
        shown = ", ".join(faults[:8]) + (f", ... ({len(faults)} in all)" if len(faults) > 8 else "")
        logging.getLogger("src").warning(f"warning: weights of {path} that did not load as expected: {shown}")


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Conv1D", "Linear4bit", "Linear8bitLt"}


def block_linears(model: torch.nn.Module) -> list[str]:
    """Block-relative paths of every linear layer inside numbered transformer blocks, in order."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        match = _BLOCK.match(name)
        if match and _is_linear(module) and name.split(".")[-1] not in OUTPUT_HEADS:
            seen.setdefault(match.group(1), None)
    return list(seen)


def unblocked_linears(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers outside the numbered blocks, the output head left out (BERT's pooler)."""
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and not _BLOCK.match(name) and not set(name.split(".")) & OUTPUT_HEADS
    ]


def _preset_paths(paths: list[str], preset: str) -> list[str]:
    def parts(p: str) -> list[str]:
        return p.split(".")

    def is_attention(p: str) -> bool:
        return bool(ATTENTION_PARENTS & set(parts(p)[:-1]))

    def leaf(p: str) -> str:
        return parts(p)[-1]

    qv = [p for p in paths if leaf(p) in Q_NAMES | V_NAMES | FUSED_QKV_NAMES]
    if preset == "attn_qv":
        return qv
    if preset == "attn":
        return [p for p in paths if leaf(p) in Q_NAMES | K_NAMES | V_NAMES | FUSED_QKV_NAMES or is_attention(p)]
    if preset == "mlp":
        return [
            p for p in paths if not is_attention(p) and leaf(p) not in Q_NAMES | K_NAMES | V_NAMES | FUSED_QKV_NAMES
        ]
    return list(paths)


def resolve_target_modules(model: torch.nn.Module, lora: LoraConfig) -> Union[str, list[str]]:
    """peft ``target_modules`` for the preset or explicit list, checked against the model.

    Presets become a regex over block-relative paths (``.*\\.\\d+\\.(self_attn\\.q_proj|...)``),
    which is unambiguous where leaf names repeat (BERT's ``output.dense``). Explicit names
    keep peft's suffix matching and may include preset names: ``[all_linear, lm_head]``.
    """
    paths = block_linears(model)
    requested = lora.target_modules or [lora.preset]
    block_paths: list[str] = []
    names: list[str] = []
    for item in requested:
        if item == "all_but_head":  # the block linears, and the linears outside the blocks but the head
            names.extend(n for n in unblocked_linears(model) if n not in names)
        if item in LORA_PRESETS:
            found = _preset_paths(paths, item)
            if not found:
                raise ConfigError(
                    [f"lora.preset: {item!r} finds no layers in {type(model).__name__}; its block linears: {paths}"]
                )
            block_paths.extend(p for p in found if p not in block_paths)
        else:
            names.append(item)
    module_names = [n for n, m in model.named_modules() if _is_linear(m)]
    unmatched = [name for name in names if not any(n == name or n.endswith("." + name) for n in module_names)]
    if unmatched:
        leaves = sorted({n.split(".")[-1] for n in module_names})
        raise ConfigError(
            f"lora.target_modules: {name!r} matches no linear layer of {type(model).__name__}; its linear layer "
            f"names: {leaves}"
            for name in unmatched
        )
    if not block_paths:
        return names
    pattern = r".*\.\d+\.(?:" + "|".join(re.escape(p) for p in block_paths) + ")"
    if names:
        pattern += r"|(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"
    return pattern


def target_leaf_names(model: torch.nn.Module) -> list[str]:
    """Sorted leaf names of the layers that received LoRA adapters, e.g. ['q_proj', 'v_proj']."""
    return sorted({name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")})


def to_lora_config(lora: LoraConfig, target_modules: Union[str, list[str]], task: str):
    """The peft LoraConfig. Classification heads are saved with the adapter (task type SEQ_CLS). LoRA+ is no field
    of it: its ratio sets the optimizer's groups (:func:`src.training.use_loraplus`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=target_modules,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=lora.init,
        task_type=TaskType.CAUSAL_LM if task == "sft" else TaskType.SEQ_CLS,
    )


def apply_lora(model: torch.nn.Module, lora: LoraConfig, task: str):
    """Wrap the base model with LoRA adapters on the resolved targets; with ``lora=none`` (full fine-tuning)
    return the model itself with every parameter trainable."""
    if is_full_fine_tuning(lora):
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, to_lora_config(lora, resolve_target_modules(model, lora), task))


# PiSSA and OLoRA train an adapter on a base they changed; the adapter as it started, saved here before training,
# lets peft save the trained one as a plain LoRA (of twice the rank) on the original base, which is what inference
# and export load.
INITIAL_ADAPTER_DIR = "initial_adapter"


def save_initial_adapter(model: torch.nn.Module, lora: LoraConfig, output_dir: Path) -> None:
    """Save the adapter as it starts, where ``lora.init`` changed the base (:data:`INITIAL_ADAPTER_DIR`)."""
    if changes_base(lora.init):
        model.save_pretrained(output_dir / INITIAL_ADAPTER_DIR)


def save_adapter(model: torch.nn.Module, lora: LoraConfig, directory: Path) -> None:
    """``model.save_pretrained(directory)``; after a base-changing init, converted to a plain LoRA on the original
    base against the adapter as it started (:func:`save_initial_adapter`, beside ``directory``). peft's conversion
    keeps the LoRA weights alone, so a classifier's trained head (``modules_to_save``) is added back to its file."""
    if not changes_base(lora.init):
        model.save_pretrained(directory)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    initial = directory.parent / INITIAL_ADAPTER_DIR
    model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(initial))
    heads = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items() if "lora_" not in k}
    if heads:
        weights = directory / "adapter_model.safetensors"
        save_file({**load_file(str(weights)), **heads}, str(weights), metadata={"format": "pt"})


def is_full_fine_tuning(lora: LoraConfig) -> bool:
    """``lora=none``: no adapter; the run trains and saves the whole model."""
    return lora.preset == FULL_FINE_TUNING


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper, or the model itself (full fine-tuning)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def adapters_disabled(model: torch.nn.Module):
    """A context in which the model, before training, computes as its base: peft's ``disable_adapter``; nothing to
    disable in a fully fine-tuned model, which is its own base, or after a base-changing init (PiSSA, OLoRA), whose
    untrained adapter adds back to the base what the init took out of it."""
    disable = getattr(model, "disable_adapter", None)
    inits = [config.init_lora_weights for config in getattr(model, "peft_config", {}).values()]
    return contextlib.nullcontext() if disable is None or any(map(changes_base, inits)) else disable()


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts its real size."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# The causal LMs whose forward computes nothing between the decoder, lm_head and the loss (no logit scaling or
# soft-capping), so that train.fused_loss (src/engine/loss.py) is the model's own loss.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def fused_head(model: torch.nn.Module) -> Optional[tuple[torch.nn.Module, Any, Optional[str]]]:
    """``(decoder, head, adapter)`` where :func:`src.engine.loss.causal_lm_loss` computes the model's own loss, else
    None. ``head``: a frozen ``torch.nn.Linear`` without bias (``adapter`` None), or peft's LoRA ``Linear`` around
    one with a single plain LoRA adapter active, ``adapter`` (no DoRA, no LoRA bias, not merged)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(lm, "get_decoder"):
        return None
    head = lm.get_output_embeddings()
    base = getattr(head, "base_layer", head)
    if type(base) is not torch.nn.Linear or base.bias is not None:  # a bnb or cached-dequantized head: not here
        return None
    if base.weight.requires_grad:  # a trained head (full fine-tuning): its weight's gradient is not computed here
        return None
    name = None
    if head is not base:
        active = [name for name in head.active_adapters if name in head.lora_A]
        if getattr(head, "merged", False) or len(active) != 1 or head.disable_adapters:
            return None
        name = active[0]
        if head.use_dora.get(name) or getattr(head, "lora_bias", {}).get(name):
            return None
    return lm.get_decoder(), head, name
