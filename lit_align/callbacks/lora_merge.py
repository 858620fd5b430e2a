"""Export the trained policy as a standard Hugging Face model directory, with any LoRA adapter merged in.

The directory (safetensors weights, config, tokenizer) loads with ``from_pretrained``, serves from ``vllm serve`` or
``python -m lit_align.generation.serve``, and is what the next stage's ``model_name_or_path`` points at. A LoRA
adapter is also saved on its own in peft's format under ``adapter/``. Merging never touches the training model: the
base is reloaded in full precision (so a QLoRA run merges into real weights, not 4-bit ones), the adapter is loaded onto
it and merged there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch

from lit_align.models import is_score_model, is_zero3_partitioned, save_tokenizer


class ExportError(RuntimeError):
    """The export target is unusable (it already holds a model, or there is nothing to export)."""


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def check_output_dir(output_dir: str | Path) -> Path:
    """Refuse a directory that already holds something: exports never overwrite."""
    path = Path(output_dir).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"export directory {path} already exists and is not empty; choose another output_dir or remove it")
    return path


def export_merged_model(model, tokenizer, output_dir: str | Path, base_model: str, dtype: str = "float32",
                        head: str = "lm") -> Path:
    """Write ``model`` (an HF model, or a peft model over ``base_model``) to ``output_dir`` as a merged HF directory.

    Returns the directory. Written to a temporary sibling first and renamed, so a failure never leaves half a model.
    transformers' progress bars (reloading the base, writing shards) are off meanwhile: the caller reports the export.
    """
    from lit_align.models import load_causal_lm

    target = check_output_dir(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with _no_transformers_bars():
            if _is_peft(model):
                from peft import PeftModel

                model.save_pretrained(tmp / "adapter")
                base = load_causal_lm(base_model, dtype=dtype, head=head)
                merged = PeftModel.from_pretrained(base, tmp / "adapter").merge_and_unload()
            else:
                merged = model
            if dtype != "float32":
                merged = merged.to(getattr(torch, dtype))
            merged.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)
            if target.exists():
                target.rmdir()  # empty (checked above)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' progress bars off (restored after): an export's reload and shard writing are one line of ours."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class LoRAMerge(L.Callback):
    """At the end of fit, save the policy as a merged HF model directory (and the adapter alone, if any).

    Args:
        output_dir: where to write; null writes ``<log_dir>/model`` beside the run's logs and checkpoints.
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16").
        link: a path made a symbolic link to the exported model once it is written, for the next stage's config to
            name whichever run wrote it (the quickstart configs link ``runs/quickstart/<stage>-model``). An earlier
            link there is re-pointed (the model it pointed at stays where it is); a real file or directory there is
            never replaced: the run says so when it starts and when it ends, and its model is only at ``output_dir``.
    """

    def __init__(self, output_dir: str | None = None, dtype: str = "float32", link: str | None = None) -> None:
        self.output_dir = output_dir
        self.dtype = dtype
        self.link = link
        self.exported_to: Path | None = None

    def export_dir(self, trainer: L.Trainer) -> Path:
        """Where this run exports: ``output_dir``, or ``<log_dir>/model``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        root = trainer.logger.log_dir if trainer.logger is not None else trainer.default_root_dir
        return Path(root) / "model"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            check_output_dir(self.export_dir(trainer))  # fail before training, not after hours of it
            if self._link_blocked():
                pl_module.print(f"lit_align: {self.link} is not a link (a model `make quickstart` published, or one "
                                f"copied there), so it will be left as it is and not point at this run's model; that "
                                f"goes to {self.export_dir(trainer)}", file=sys.stderr)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise ExportError(f"{type(pl_module).__name__} has no `model` to export")
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            model = _unsharded_copy(trainer, pl_module)  # every process takes part in the gathering
        elif is_zero3_partitioned(pl_module):
            model = _gathered_copy(trainer, pl_module)  # the same, for DeepSpeed ZeRO-3's partitions
        if not trainer.is_global_zero:
            return
        head = "score" if is_score_model(model) else "lm"
        with torch.no_grad():
            self.exported_to = export_merged_model(model, pl_module.tokenizer, self.export_dir(trainer),
                                                   base_model=pl_module.hparams.model_name_or_path, dtype=self.dtype, head=head)
        pl_module.print(f"lit_align: exported the trained model to {self.exported_to}")
        if self.link is None or Path(self.link).expanduser().resolve() == self.exported_to.resolve():
            return  # no link, or the link's path is output_dir itself
        if self._link_blocked():
            pl_module.print(f"lit_align: {self.link} is not a link, so it was left as it is: it does not hold this run's "
                            "model", file=sys.stderr)
        else:
            pl_module.print(self._point_link(self.exported_to))

    def _link_blocked(self) -> bool:
        link = Path(self.link).expanduser() if self.link is not None else None
        return link is not None and link.exists() and not link.is_symlink()

    def _point_link(self, target: Path) -> str:
        """Make ``link`` a relative symbolic link to ``target`` (replacing an earlier link in one rename); returns what
        was done, in a line for the log."""
        link = Path(self.link).expanduser()
        link.parent.mkdir(parents=True, exist_ok=True)
        before = os.readlink(link) if link.is_symlink() else None
        staged = link.with_name(f".{link.name}.link-{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True)
        os.replace(staged, link)  # atomic: the link always names a whole model
        was = f" (it pointed at {before})" if before is not None else ""
        return f"lit_align: {link} now points at {target}{was}"


def _unsharded_copy(trainer: L.Trainer, pl_module: L.LightningModule):
    """Under FSDP: the policy as one process-local HF model on global rank 0 (None elsewhere).

    The wrapped policy's weights are shards, and reading its state dict is a collective every process must join, so
    the whole state dict is gathered to rank 0 (as Lightning does for a full checkpoint) and loaded into a fresh copy
    of the module built from its hyperparameters."""
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    with lightning_fsdp._get_full_state_dict_context(trainer.strategy.model, world_size=trainer.world_size):
        state = trainer.strategy.model.state_dict()
    return _fresh_policy(pl_module, state) if trainer.is_global_zero else None


def _gathered_copy(trainer: L.Trainer, pl_module: L.LightningModule):
    """Under DeepSpeed ZeRO-3: the policy as one process-local HF model on global rank 0 (None elsewhere). Every
    process joins the gathering of all the partitions (each then holds the whole module for a moment); rank 0
    copies the state dict and loads it into a fresh copy of the module."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(pl_module.parameters())):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()} if trainer.is_global_zero else None
    return _fresh_policy(pl_module, state) if trainer.is_global_zero else None


def _fresh_policy(pl_module: L.LightningModule, state: dict):
    """The policy of a new module built from ``pl_module``'s hyperparameters, holding the weights ``state``."""
    fresh = type(pl_module)(**{k: v for k, v in pl_module.hparams.items() if not k.startswith("_")})
    fresh.configure_model()
    fresh.load_state_dict(state, strict=False)
    return fresh.model


def merge_checkpoint(ckpt_path: str | Path, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Merge the LoRA adapter of a lit_align Lightning checkpoint into its base model and export the result."""
    from lit_align.models import LoRAConfig, apply_lora, load_causal_lm, load_tokenizer

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ExportError(f"checkpoint {ckpt_path} does not exist")
    check_output_dir(output_dir)  # before any loading
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    lora = hparams.get("lora")
    if lora is None or "model_name_or_path" not in hparams:
        raise ExportError(f"checkpoint {ckpt_path} holds no LoRA adapter (trained with lora: null, or not a lit_align "
                          "module); a full fine-tuning run is exported with the LoRAMerge callback instead")
    lora = LoRAConfig(**lora) if isinstance(lora, dict) else lora
    state = checkpoint["state_dict"]
    head = "score" if any(".score." in k for k in state) else "lm"
    policy = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    base = load_causal_lm(hparams["model_name_or_path"], dtype="float32", head=head)
    model = apply_lora(base, lora, task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
    missing = [k for k in policy if k not in dict(model.named_parameters())]
    if missing:
        raise ExportError(f"checkpoint weights do not fit the rebuilt model (first: {missing[0]})")
    model.load_state_dict(policy, strict=False)
    tokenizer = load_tokenizer(hparams.get("tokenizer_name_or_path") or hparams["model_name_or_path"])
    return export_merged_model(model, tokenizer, output_dir, base_model=hparams["model_name_or_path"], dtype=dtype, head=head)


def main(argv: list[str] | None = None) -> int:
    """``lit_align merge-lora --ckpt_path CKPT --output_dir DIR``."""
    from lit_align.hints import HintingArgumentParser

    parser = HintingArgumentParser(prog="lit_align merge-lora", description="Merge a checkpoint's LoRA adapter into "
                                   "its base model and save a standard Hugging Face model directory (+ the adapter).")
    parser.add_argument("--ckpt_path", required=True, help="a lit_align Lightning checkpoint trained with LoRA")
    parser.add_argument("--output_dir", required=True, help="new directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved weight dtype")
    args = parser.parse_args(argv)
    try:
        out = merge_checkpoint(args.ckpt_path, args.output_dir, args.dtype)
    except ExportError as err:
        print(f"lit_align merge-lora: error: {err}", file=sys.stderr)
        return 2
    print(f"lit_align merge-lora: wrote {out}")
    return 0
