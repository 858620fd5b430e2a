"""Policy, tokenizer and LoRA/QLoRA factory.

Everything that needs weights goes through :func:`load_causal_lm` and :func:`load_tokenizer`, which take
a Hugging Face hub id, a local directory, or a built-in offline preset written as ``preset:<name>`` or
``preset:<name>:<seed>`` (for example ``preset:tiny``). A preset is a small Llama-shaped model and a
byte-level tokenizer built deterministically from the seed, written once to a cache directory
(``$LIT_ALIGN_CACHE``, default ``~/.cache/lit_align``) and then loaded like any local checkpoint, so
QLoRA, ``save_pretrained`` and an inference server all treat it as a real model.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

PRESET_PREFIX = "preset:"
PRESET_FORMAT_VERSION = 1

PRESETS: dict[str, dict] = {
    # About 0.9M parameters: seconds per step on a laptop CPU; the quickstart and the tests use it.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    # About 5M parameters: for CPU experiments that need more capacity.
    "tiny-base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
}

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

DType = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class LoRAConfig:
    """Low-rank adapters through peft; the paper uses r=32 on every linear layer of the transformer blocks."""

    r: int = 32
    """Adapter rank."""
    alpha: int = 64
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module name suffixes to adapt, or "all-linear" for every linear layer except the LM/score head."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved beside the adapter (for example a reward model's "score" head)."""

    def __post_init__(self) -> None:  # refused while the CLI builds the module, before a run directory exists
        if self.r <= 0:
            raise ValueError(f"lora.r must be a positive rank, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names what and why."""


def parse_preset(name_or_path: str) -> tuple[str, int] | None:
    """``preset:tiny`` -> ("tiny", 0); ``preset:tiny:3`` -> ("tiny", 3); anything else -> None."""
    if not name_or_path.startswith(PRESET_PREFIX):
        return None
    parts = name_or_path[len(PRESET_PREFIX):].split(":")
    name = parts[0]
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r} in {name_or_path!r}; available presets: {sorted(PRESETS)}")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ModelLoadError(f"preset spec {name_or_path!r} must look like 'preset:{name}' or 'preset:{name}:<seed>'")
    return name, int(parts[1]) if len(parts) == 2 else 0


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align"))


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2's scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_byte_tokenizer():
    """A byte-level tokenizer: 4 special tokens then one token per byte (vocabulary 260), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=2048,
    )


def build_preset_model(name: str, seed: int = 0):
    """The preset's Llama-shaped causal LM with weights drawn from ``seed`` (the global RNG is left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **PRESETS[name],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def transformers_major() -> int:
    """The installed transformers' major version."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def materialize_preset(name_or_path: str) -> str:
    """Return a local directory for a model spec: presets are built and cached on first use, others pass through."""
    parsed = parse_preset(name_or_path)
    if parsed is None:
        return name_or_path
    name, seed = parsed
    # One copy per transformers major version: a directory saved by transformers 5 names its tokenizer class
    # "TokenizersBackend", which transformers 4 cannot load (two virtualenvs share this cache)
    major = transformers_major()
    target = cache_dir() / "presets" / f"{name}-seed{seed}-v{PRESET_FORMAT_VERSION}-transformers{major}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_preset_model(name, seed)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lit_align_preset.json").write_text(json.dumps({"preset": name, "seed": seed}))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether a model name can only mean a local directory: it starts with ".", "/" or "~", or has more than one
    "/" (a hub id is "name" or "namespace/name")."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def _hub_offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_retries_hint() -> str:
    """What to add to a message about an unreachable hub: that only the local cache was read where the hub's host
    does not resolve (:func:`hub_resolves`), else the environment variable that skips huggingface_hub's retries
    (about 20 s of them per file) on a machine without internet, unless it is already set."""
    if _hub_offline_set():
        return ""
    if not hub_resolves():
        return "; the hub's host does not resolve here, so only the local cache was read"
    return " (on a machine without internet, HF_HUB_OFFLINE=1 skips the hub's retries)"


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def hub_resolves(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host name resolves here (asked once per process, for at most ``timeout``
    seconds). Where it does not, nothing can reach the hub, and a load that asked it would spend about 20 s in
    huggingface_hub's retries per file before failing. True when undecided: behind a proxy (which resolves names
    itself), with HF_HUB_OFFLINE set (transformers then reads the cache on its own), or when resolving takes longer."""
    import socket
    import threading
    from urllib.parse import urlparse

    if _hub_offline_set() or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    answer: dict[str, bool] = {}

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer["resolves"] = True
        except socket.gaierror:
            answer["resolves"] = False
        except OSError:
            answer["resolves"] = True

    thread = threading.Thread(target=resolve, name="lit_align-hub-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer.get("resolves", True)


@contextmanager
def datasets_cache_only_without_hub():
    """``datasets.load_dataset`` of a hub id in offline mode where the hub's host does not resolve
    (:func:`hub_resolves`): it reads the datasets cache, and a dataset not there fails at once instead of after
    huggingface_hub's retries (datasets has no per-call switch; its and huggingface_hub's offline flags are set for
    the call and put back: ``HF_HUB_OFFLINE``, named ``HF_DATASETS_OFFLINE`` in datasets < 3). Anywhere else a no-op."""
    if hub_resolves():
        yield
        return
    import datasets
    from huggingface_hub import constants

    flags = [(module, name) for module in (datasets.config, constants)
             for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


def hub_kwargs(path: str) -> dict:
    """``from_pretrained`` keywords for ``path`` (a local directory, or a hub id): ``local_files_only`` for a hub id
    where the hub's host does not resolve (:func:`hub_resolves`), so the load reads the local cache and fails at once
    when the files are not there, instead of retrying the hub."""
    if looks_like_local_path(path) or Path(path).expanduser().exists():
        return {}
    return {} if hub_resolves() else {"local_files_only": True}


def pinned_model_path(name_or_path: str | None) -> str | None:
    """``name_or_path`` itself, unless it is a symbolic link to a model directory (LoRAMerge's ``link``, such as
    ``runs/quickstart/sft-model``): then the directory it points at now, relative when ``name_or_path`` was. A module
    records this in its hyperparameters, so its checkpoints name the model they were trained from, which a later run
    re-pointing the link does not change."""
    if name_or_path is None or not Path(name_or_path).expanduser().is_symlink():
        return name_or_path
    target = Path(name_or_path).expanduser().resolve()
    if not target.exists():
        return name_or_path  # a dangling link: the load names it
    return str(target) if Path(name_or_path).expanduser().is_absolute() else os.path.relpath(target)


def _load_error(name_or_path: str, err: Exception) -> ModelLoadError:
    if Path(name_or_path).expanduser().exists():
        what = f"{name_or_path!r} exists but is not a loadable model directory"
    elif looks_like_local_path(name_or_path):
        return ModelLoadError(f"cannot load model: local model directory {name_or_path!r} does not exist (train and "
                              "export the stage that writes it first, or point at a model directory)")
    else:
        what = (f"{name_or_path!r} is not a local directory and could not be loaded from the Hugging Face hub "
                f"(no such id, or the hub is unreachable/offline{hub_retries_hint()})")
    return ModelLoadError(f"cannot load model: {what}. Use a local path, a reachable hub id or a built-in preset "
                          f"({', '.join(PRESET_PREFIX + p for p in PRESETS)}). Cause: {type(err).__name__}: {err}")


def load_tokenizer(name_or_path: str, padding_side: Literal["left", "right"] = "right"):
    """The tokenizer of a hub id, local directory or preset, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    path = materialize_preset(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


LOAD_TIME_TOKENIZER_KEYS = ("local_files_only", "is_local")
"""Keys transformers 5 copies from how a tokenizer was loaded into the ``tokenizer_config.json`` it saves (offline:
``"local_files_only": true``); they describe that load, not the tokenizer."""


PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""transformers 5's class name for a tokenizer that is only a ``tokenizer.json`` (the tiny preset's), and the name
transformers 4 loads such a tokenizer by; transformers 5 reads the second as the first."""


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, without the keys of :data:`LOAD_TIME_TOKENIZER_KEYS`, so an exported
    model does not carry this machine's loading options to wherever it is published, and with the class names of
    :data:`PORTABLE_TOKENIZER_CLASSES`, so it loads with transformers 4 as well."""
    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        kept = {k: v for k, v in config.items() if k not in LOAD_TIME_TOKENIZER_KEYS}
        if (path.parent / "tokenizer.json").exists() and kept.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASSES:
            kept["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[kept["tokenizer_class"]]
        if kept != config:
            path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def _torch_dtype(dtype: DType):
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def checkpoint_hyperparameters(path: str | Path) -> dict:
    """The hyperparameters a Lightning checkpoint was saved with, read memory-mapped (its weights stay on disk).
    Raises what ``torch.load`` raises for a missing, torn or foreign file."""
    checkpoint = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}


def import_model_classes(name_or_path: str) -> None:
    """Import the transformers module that defines the model classes of ``name_or_path``'s architecture, if it can
    be found (errors are left to the load itself, which names them).

    Call it before DeepSpeed's ``zero.Init`` is entered. ``zero.Init`` patches the ``__init__`` of every module class
    defined while it is active and, on exit, puts back the ``__init__`` the class had when it was defined. Since
    transformers 5.25 the attention classes' ``__init__`` is wrapped right after their definition (the ``kernels``
    package's ``use_kernelized_func``), so a class first imported inside ``zero.Init`` loses that wrapper on exit and
    every model built later fails its first forward pass ("'LlamaAttention' object has no attribute
    '_kernel_funcs'")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        path = materialize_preset(name_or_path)
        config = AutoConfig.from_pretrained(path, **hub_kwargs(path))
        AutoModelForCausalLM._model_mapping[type(config)]  # the lazy mapping imports the defining module
    except (OSError, ValueError, KeyError):
        pass


def load_causal_lm(
    name_or_path: str,
    dtype: DType = "float32",
    attn_implementation: str | None = None,
    quantize_4bit: bool = False,
    gradient_checkpointing: bool = False,
    head: Literal["lm", "score"] = "lm",
):
    """A causal LM (``head="lm"``) or a scalar-headed sequence scorer on the same backbone (``head="score"``).

    ``quantize_4bit`` loads the linear layers as bitsandbytes 4-bit NF4 with double quantization and computes
    in ``dtype`` (float32 when "auto"); it is meant to be combined with LoRA (QLoRA).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = materialize_preset(name_or_path)
    kwargs: dict = {"dtype": _torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
        )
    cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    if head == "score":
        kwargs["num_labels"] = 1
    try:
        with _HeldLoadWarnings() as held:
            model, loading = cls.from_pretrained(path, output_loading_info=True, **kwargs, **hub_kwargs(path))
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    if head == "score" and _is_new_score_head(loading):
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"lit_align: {name_or_path} has no score head: a new one is drawn (its lm_head is not loaded)")
    else:
        held.release()
    if head == "score":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        _initialize_partitioned_new_head(model, loading["missing_keys"])
    if quantize_4bit:
        from peft import prepare_model_for_kbit_training

        # checkpointing enabled below: peft would call transformers' deprecated gradient_checkpointing_enable
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_differentiable(model)
    if gradient_checkpointing:
        # non-reentrant (torch warns that reentrant must be chosen explicitly), which needs no input that requires
        # grad; full-precision models have always been given one, a 4-bit base is prepared as peft does it
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' current name (the old one goes in v6)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not quantize_4bit:
            model.enable_input_require_grads()
    model.config.use_cache = not gradient_checkpointing
    return model


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel. On a CPU with AVX-512 BF16, a
    ``Linear4bit``'s first pass in eval mode without gradient (a validation or reference pass, generation) repacks its
    weight for good, and every later pass, training ones included, runs that kernel, which has no backward: the
    gradient through the layer to its input is dropped with only a warning ("bitsandbytes::gemv_4bit: an autograd
    kernel was not registered"), so the LoRA adapters below it train on wrong gradients (bitsandbytes 0.50; a GPU
    never takes that path). Passes then dequantize the weight as training passes do."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


class _HeldLoadWarnings(logging.Filter):
    """While open, holds back the warnings of transformers' loading logger (transformers 5's "LOAD REPORT" table,
    transformers 4's "Some weights of ...") for the caller to :meth:`release` or drop once the load's outcome says
    whether they are news; an error inside releases them, since they may explain it."""

    LOGGER = "transformers.modeling_utils"

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> "_HeldLoadWarnings":
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)
        if exc_type is not None:
            self.release()

    def release(self) -> None:
        logger = logging.getLogger(self.LOGGER)
        for record in self.records:
            logger.handle(record)
        self.records.clear()


def _is_new_score_head(loading: dict) -> bool:
    """Whether a scalar-headed model was loaded from a causal LM and nothing else differed: the checkpoint's
    ``lm_head`` unused and the ``score`` head missing, which is how every reward model starts from an SFT model
    (transformers reports both as a table of UNEXPECTED and MISSING keys, as for a checkpoint that does not fit)."""
    missing, unexpected = set(loading.get("missing_keys", ())), set(loading.get("unexpected_keys", ()))
    return (bool(missing) and all(k.split(".")[0] == "score" for k in missing)
            and all(k.split(".")[0] == "lm_head" for k in unexpected)
            and not loading.get("mismatched_keys") and not loading.get("error_msgs"))


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # pragma: no cover - bitsandbytes is a dependency, but keep LoRA usable without it
        pass
    return tuple(types)


HEAD_NAMES = ("lm_head", "score", "v_head", "value_head", "embed_out", "output")


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer of the transformer blocks: everything linear except embeddings and heads."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _linear_types()) and name.split(".")[-1] not in HEAD_NAMES:
            names.append(name)
    return names


def lora_targets(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """The module names peft adapts for ``lora.target_modules``; a name matching no linear layer of the transformer
    blocks is a ``ModelLoadError`` naming the layers there are."""
    candidates = block_linear_names(model)
    if lora.target_modules == "all-linear":
        return sorted({n.split(".")[-1] for n in candidates})
    wanted = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in candidates)]
    if missing:
        raise ModelLoadError(f"lora.target_modules {missing} match no linear layer of the model; "
                             f"the transformer blocks have: {sorted({n.split('.')[-1] for n in candidates})}")
    return wanted


def check_lora_targets(name_or_path: str, lora: LoRAConfig) -> None:
    """Refuse ``lora.target_modules`` that match no linear layer of ``name_or_path``'s architecture, from its config
    alone: the network is built on the meta device, so no weight is read or allocated. A config that cannot be read
    here (an unreachable hub id) is left to the load itself, which names the problem."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if lora.target_modules == "all-linear":
        return
    try:
        path = materialize_preset(name_or_path)
        config = AutoConfig.from_pretrained(path, **hub_kwargs(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return
    lora_targets(model, lora)


def apply_lora(model: nn.Module, lora: LoRAConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with a LoRA adapter; a target list that matches no module is an error naming the choices."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, lora)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        modules_to_save=lora.modules_to_save, task_type=task_type, bias="none")
    model = get_peft_model(model, config)
    _zero_partitioned_lora_b(model)
    # Trainable weights stay in float32 over a bf16/fp16 base (so do their optimizer states): small updates to an
    # adapter are lost to half-precision rounding otherwise. Mixed-precision autocast handles the matmuls. Not for
    # ZeRO-3's partitioned weights: only their empty local view is here, and DeepSpeed's optimizer keeps fp32 masters.
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) and not hasattr(p, "ds_id"):
            p.data = p.data.float()
    return model


def _initialize_partitioned_new_head(model: nn.Module, missing_keys) -> None:
    """Draw a new score head (absent from the checkpoint) that DeepSpeed ZeRO-3 partitioned as it was created.

    transformers 4 initializes missing weights under ZeRO-3 by gathering the tensors of ``state_dict()``, which are
    detached copies DeepSpeed does not gather: the head kept the uninitialized memory of its allocation (the 2-process
    reward test's losses were 1e31 with transformers 4.57). It is drawn here as transformers draws a linear layer's
    weight, normal with the config's ``initializer_range``, bias zero, while gathered, rank 0's draw given to every
    process. It is drawn right after loading, where transformers draws it in an unpartitioned build: with transformers
    4.57 both draws are equal (the 2-process ZeRO-3 reward test matches the one-process run). transformers 5
    initializes the head correctly itself and is left to it."""
    if transformers_major() >= 5:
        return
    head = getattr(model, "score", None)
    partitioned = [p for name, p in (head.named_parameters() if head is not None else ())
                   if f"score.{name}" in missing_keys and hasattr(p, "ds_id")]
    if not partitioned:
        return
    import deepspeed

    std = getattr(model.config, "initializer_range", 0.02)
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        for p in partitioned:
            if p.dim() > 1:
                nn.init.normal_(p.data, std=std)
            else:
                p.data.zero_()


def _zero_partitioned_lora_b(model: nn.Module) -> None:
    """Make LoRA start as the identity when DeepSpeed ZeRO-3 partitioned the new layers as they were created.

    Under ZeRO-3 Lightning builds the model inside ``deepspeed.zero.Init``: each layer's parameters are split across
    processes the moment the layer exists, so peft's ``zeros_(lora_B)`` afterwards writes into an empty local view and
    B keeps its default (random) initialisation. The A matrices are drawn before partitioning, identically on every
    process (same seed), so only B needs its zeros, written while gathered."""
    partitioned = [p for n, p in model.named_parameters() if "lora_B" in n and hasattr(p, "ds_id")]
    if not partitioned:
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        for p in partitioned:
            p.data.zero_()


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each transformer block of ``model`` in place (regional compilation): the blocks are the
    modules whose class the model names in ``_no_split_modules`` (``LlamaDecoderLayer``), found through peft's and
    other wrappers. One block's graph serves every layer, so compiling costs a fraction of compiling the whole model;
    the embeddings, the LM head and the loss stay eager. ``nn.Module.compile`` keeps parameter names, so checkpoints
    and exports are those of the uncompiled model. Returns the number of blocks compiled; raises ValueError when the
    model names no block class or none is found."""
    base = outermost_transformers_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"torch_compile: found no transformer block to compile in {type(base or model).__name__} "
                         f"(its _no_split_modules: {sorted(names) or 'none'})")
    for block in blocks:
        block.compile(dynamic=True)  # lengths change between batches: one graph with symbolic shapes, not one per length
    return len(blocks)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (nn.Dropout modules and HF attention layers' attention_dropout).

    Objectives that compare two forward passes of one network (DPO's policy vs reference, PPO's ratio) need it: with
    dropout on, a policy and its own adapter-disabled copy disagree before any update.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def outermost_transformers_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers ``PreTrainedModel`` in ``model``, which may be wrapped (peft, FSDP, DeepSpeed);
    None when there is none."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def cache_keyword(model: nn.Module) -> str:
    """The keyword argument by which ``model``'s forward takes a KV cache: ``cache`` in the transformers versions that
    deprecate ``past_key_values`` (removed in 5.40), ``past_key_values`` before them. ``model`` may be wrapped (peft,
    FSDP, DeepSpeed): its outermost transformers model decides."""
    hf = outermost_transformers_model(model)
    return "past_key_values" if hf is None else _cache_keyword_of(type(hf))


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a transformers forward pass returned (its ``cache``, or ``past_key_values`` in earlier versions),
    None when it returned none; read without the deprecation warning of the old name."""
    name = "cache" if "cache" in getattr(output, "__dataclass_fields__", ()) else "past_key_values"
    return getattr(output, name, None)


def lora_to_dict(lora: LoRAConfig | None) -> dict | None:
    return None if lora is None else asdict(lora)


def is_score_model(model: nn.Module) -> bool:
    """Whether ``model`` (or the model under a peft wrapper) is a transformers sequence scorer (a reward model:
    ``...ForSequenceClassification``, a score head where a causal LM has its LM head)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return type(model).__name__.endswith("ForSequenceClassification")


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``model``'s parameters (each process holds a shard until gathered)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathers_weights_per_forward(model: nn.Module) -> bool:
    """Whether every forward pass of ``model`` gathers its weights from all processes (DeepSpeed ZeRO-3 partitions,
    FSDP units), so that every process must make the same forward passes."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return is_zero3_partitioned(model) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def whole_shapes(model: nn.Module) -> dict[int, torch.Size]:
    """The whole shapes of the parameters of which this process holds only a shard, keyed by ``id(parameter)``:
    DeepSpeed ZeRO-3 records them on each parameter (``ds_shape``); FSDP (``use_orig_params``, Lightning's default)
    in each unit's flat parameter, beside the original parameters it views."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    shapes: dict[int, torch.Size] = {}
    for module in model.modules():
        flat = module._flat_param if isinstance(module, FullyShardedDataParallel) else None
        if flat is not None and getattr(flat, "_params", None):
            shapes.update({id(p): shape for p, shape in zip(flat._params, flat._shapes)})
    for p in model.parameters():
        if hasattr(p, "ds_shape"):
            shapes[id(p)] = p.ds_shape
    return shapes


def parameter_shape(p: torch.Tensor, shapes: dict[int, torch.Size]) -> torch.Size:
    """``p``'s whole shape (``shapes`` from :func:`whole_shapes`), also where this process holds a shard of it."""
    return shapes.get(id(p), p.shape)


def count_parameters(model: nn.Module, wrapper: nn.Module | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts, whole also under FSDP and ZeRO-3; 4-bit weights count as the number of
    values they hold. ``wrapper``: the module ``model`` is wrapped in, if any (Lightning's FSDP root unit wraps the
    LightningModule: ``trainer.strategy.model``)."""
    trainable = total = 0
    shapes = whole_shapes(wrapper if wrapper is not None else model)
    for p in model.parameters():
        n = math.prod(parameter_shape(p, shapes)) * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


__all__ = [
    "LoRAConfig", "ModelLoadError", "PRESETS", "apply_lora", "check_lora_targets", "checkpoint_hyperparameters", "block_linear_names", "build_byte_tokenizer",
    "build_preset_model", "count_parameters", "disable_dropout", "is_zero3_partitioned", "load_causal_lm", "load_tokenizer",
    "materialize_preset", "parameter_shape", "parse_preset", "save_tokenizer", "whole_shapes",
]
