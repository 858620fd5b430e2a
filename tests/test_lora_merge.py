"""LoRA merge/export: the merged model computes what the adapter model computes, QLoRA included; nothing is overwritten."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.callbacks.lora_merge import ExportError, export_merged_model
from lit_align.models import LoRAConfig, apply_lora, load_causal_lm, load_tokenizer, transformers_major

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
    # transformers 5 wrote how the tokenizer was loaded here (offline: local_files_only) into the exported config
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and "is_local" not in saved and saved["eos_token"] == "</s>"
    # saved by transformers 5 as "TokenizersBackend", a class transformers 4 does not have; its own name for it loads
    # in both (transformers 4.57 encodes the same ids from this directory: checked in .venv-oldest)
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = 'def add(a, b):\n    """Return a + b."""\n    return a + b\n'
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == load_tokenizer("preset:tiny")(text).input_ids
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


def _train_briefly(tmp_path, pairs_file, lora):
    import lightning.pytorch as L

    from lit_align.data_modules.sft import SFTDataModule
    from lit_align.data_modules.sources import DataSource
    from lit_align.modules.base import OptimizerConfig
    from lit_align.modules.sft import SFT

    module = SFT(lora=lora, optimizer=OptimizerConfig(lr=1e-2))
    data = SFTDataModule(train_sources=[DataSource(path=pairs_file)], val_fraction=0.0, tokenizer="preset:tiny", batch_size=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module, trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path


def test_merge_lora_subcommand_from_checkpoint(tmp_path, pairs_file, capsys):
    from lit_align.cli import main

    module, ckpt = _train_briefly(tmp_path, pairs_file, LoRAConfig(r=4, dropout=0.0))
    out = tmp_path / "merged"
    assert main(["merge-lora", "--ckpt_path", ckpt, "--output_dir", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=PROBE).logits, module.model(input_ids=PROBE).logits, atol=1e-5)
    # a second merge into the same directory is refused and leaves it as it was
    assert main(["merge-lora", "--ckpt_path", ckpt, "--output_dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_lora_of_a_checkpoint_without_adapter_is_a_clear_error(tmp_path, pairs_file, capsys):
    from lit_align.cli import main

    _, ckpt = _train_briefly(tmp_path, pairs_file, None)
    assert main(["merge-lora", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "m")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_export_prints_no_transformers_progress_bars_and_restores_them(tmp_path, capfd):
    """The export (reloading the base, writing shards) is one line of the caller's, not transformers' bars in the
    middle of a fit's output; the bars are back on afterwards for the user's own loading."""
    from transformers.utils import logging as hf_logging

    model = _trained_adapter()
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    export_merged_model(model, load_tokenizer("preset:tiny"), tmp_path / "merged", base_model="preset:tiny")
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()
    load_causal_lm(str(tmp_path / "merged"))  # the same call prints its bar outside an export (transformers 5 has one)
    if transformers_major() >= 5:
        assert "Loading weights" in capfd.readouterr().err
