"""LoRA merge/export: the merged model computes what the adapter model computes, QLoRA included; nothing is overwritten."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.callbacks.lora_merge import ExportError, export_merged_model
from lit_align.models import LoRAConfig, apply_lora, load_causal_lm, load_tokenizer

PROBE = torch.tensor([[5, 104, 105, 106, 36, 40, 50, 60]])


def _trained_adapter(quantize_4bit=False):
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm("preset:tiny", quantize_4bit=quantize_4bit), LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():  # make the adapter non-trivial (lora_B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_merged_model_logits_equal_adapter_model_logits(tmp_path):
    model = _trained_adapter()
    with torch.no_grad():
        expected = model(input_ids=PROBE).logits
    out = export_merged_model(model, load_tokenizer("preset:tiny"), tmp_path / "merged", base_model="preset:tiny")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(input_ids=PROBE).logits
    assert torch.allclose(got, expected, atol=1e-5)  # float32 merge: W + B@A*scale vs. the two-path sum
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(out).decode([104, 105, 106]) == "def"
    # the training model still has its adapter (merging worked on a reloaded copy)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_qlora_merges_into_full_precision_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = _trained_adapter(quantize_4bit=True)
    out = export_merged_model(model, load_tokenizer("preset:tiny"), tmp_path / "merged", base_model="preset:tiny")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    # the merge is the full-precision base plus the trained adapter (not the NF4-rounded base the 4-bit model computes with)
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    full = apply_lora(load_causal_lm("preset:tiny"), LoRAConfig(r=4, dropout=0.0)).eval()
    set_peft_model_state_dict(full, get_peft_model_state_dict(model))
    with torch.no_grad():
        got, expected = merged(input_ids=PROBE).logits, full(input_ids=PROBE).logits
        plain = load_causal_lm("preset:tiny")(input_ids=PROBE).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter's update is in there


def test_full_finetuned_model_exports_as_is_and_existing_directory_is_refused(tmp_path):
    model = load_causal_lm("preset:tiny")
    out = export_merged_model(model, load_tokenizer("preset:tiny"), tmp_path / "m", base_model="preset:tiny")
    assert not (out / "adapter").exists()
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_merged_model(model, load_tokenizer("preset:tiny"), out, base_model="preset:tiny")
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".m-*"))  # no temporary directory left behind
