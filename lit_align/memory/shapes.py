"""Model shapes for the memory planner: parameter counts from a config.json or a preset, and the constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 4-bit weights with double quantization: packed values + 8-bit absmax per 64 + fp32 absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Model types whose decoder block is Llama's (RMSNorm, rotary attention with GQA, gated SiLU MLP).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "codellama", "deepseek", "internlm2", "yi"}
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OBJECTIVES = ("sft", "reward", "dpo", "orpo", "ppo", "grpo", "raft")
PAIRWISE = {"reward", "dpo", "orpo"}  # chosen and rejected go through the model together
ONLINE = {"ppo", "grpo", "raft"}
CHUNKED_LOGITS = {"sft", "dpo", "orpo", "ppo", "grpo", "raft"}  # the objectives with a logits_chunk_size option


class PlanError(ValueError):
    """The config cannot be planned; the message names the option or file at fault."""



# ---------------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-shaped causal LM, read from its config; with ``score_head`` the same decoder under a
    one-output score head instead of its LM head (a reward model: transformers' ...ForSequenceClassification)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias_only: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    score_head: bool = False

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (or anything with the same attribute names)."""
        def get(name: str, default: Any = None) -> Any:
            value = getattr(config, name, default)
            return default if value is None else value

        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
                   if get(n) is None]
        if missing:
            raise PlanError(f"model config (model_type {get('model_type', '?')!r}) lacks {missing}; the planner needs a "
                            "Llama-shaped decoder config")
        heads = int(get("num_attention_heads"))
        model_type = str(get("model_type", "llama"))
        return cls(
            vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")), num_layers=int(get("num_hidden_layers")),
            num_heads=heads, num_kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", int(get("hidden_size")) // heads)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)) or model_type == "qwen2",
            qkv_bias_only=model_type == "qwen2", mlp_bias=bool(get("mlp_bias", False)), model_type=model_type,
        )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_linear_params(self) -> int:
        """Weights and biases of one block's linear layers."""
        total = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            total += self.q_dim + 2 * self.kv_dim + (0 if self.qkv_bias_only else self.hidden_size)
        if self.mlp_bias:
            total += 2 * self.intermediate_size + self.hidden_size
        return total

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        if self.score_head:
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.head_params + self.norm_params + self.num_layers * self.block_linear_params()

    @property
    def matmul_params(self) -> int:
        """Parameters used in matrix multiplications per token: every block linear plus the LM head, or the score head
        (not the lookup)."""
        return self.num_layers * self.block_linear_params() + (self.hidden_size if self.score_head
                                                               else self.vocab_size * self.hidden_size)

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def preset_config(name: str):
    """The transformers config of a built-in preset, built from its definition (no weights are created)."""
    from transformers import LlamaConfig

    from lit_align.models import PRESETS, build_byte_tokenizer

    return LlamaConfig(vocab_size=len(build_byte_tokenizer()), tie_word_embeddings=False, **PRESETS[name])


# config.json of the papers' models, used when the hub cannot be reached (values as published on the hub).
KNOWN_CONFIGS: dict[str, dict] = {
    "deepseek-ai/deepseek-coder-1.3b-base": dict(model_type="llama", vocab_size=32256, hidden_size=2048,
                                                 intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                                                 num_key_value_heads=16, tie_word_embeddings=False),
}


def load_model_config(name_or_path: str, notes: list[str] | None = None,
                      option: str = "model.init_args.model_name_or_path"):
    """The config of a preset, a local model directory or a hub id (config.json only; never the weights); errors name
    ``option``, the config key that gave ``name_or_path``."""
    from pathlib import Path

    from lit_align.models import ModelLoadError, hub_kwargs, hub_retries_hint, looks_like_local_path, parse_preset

    try:
        parsed = parse_preset(name_or_path)
    except ModelLoadError as err:
        raise PlanError(f"{option}: {err}") from err
    if parsed is not None:
        return preset_config(parsed[0])
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if looks_like_local_path(name_or_path) and not path.exists():
        raise PlanError(f"{option}: local model directory {name_or_path!r} does not exist (train and export the "
                        "previous stage first; to plan before it exists, give the model that stage starts from, which "
                        f"has the same architecture: --{option.partition(' ')[0]} ID_OR_DIR, for configs/iotacode "
                        "deepseek-ai/deepseek-coder-1.3b-base)")
    try:
        return AutoConfig.from_pretrained(name_or_path, **hub_kwargs(name_or_path))
    except (OSError, ValueError) as err:
        if name_or_path in KNOWN_CONFIGS and not path.exists():
            if notes is not None:
                notes.append(f"{name_or_path}: hub unreachable, used lit_align's built-in copy of its config.json"
                             f"{hub_retries_hint()}")
            return _known_config(name_or_path)
        if path.exists():
            raise PlanError(f"{option}: {name_or_path!r} exists but has no readable "
                            f"config.json ({type(err).__name__}: {err})") from err
        raise PlanError(
            f"{option}: cannot read the config.json of {name_or_path!r}: it is not a local "
            "model directory and the Hugging Face hub could not provide it (offline, or no such id). Download it "
            f"once (`huggingface-cli download {name_or_path} config.json`) or point at a local directory. "
            f"Cause: {type(err).__name__}: {err}") from err


def _known_config(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(**KNOWN_CONFIGS[name])


def _namespace_to_dict(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value
