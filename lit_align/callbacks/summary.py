"""The command line's model summary: Lightning's rich table, without a FLOPs column it cannot fill.

Lightning counts a module's FLOPs only by running its ``example_input_array``, which lit_align's modules do not set (a
batch's shape varies, and a forward on rank 0 alone would hang a sharded model), so its summary printed a FLOPs column
of zeros and "Total FLOPs: 0". The FLOPs of training are TokenThroughput's (``train/flops_per_batch``,
``train/mfu``, lit_align/callbacks/throughput.py).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class ModelSummary(RichModelSummary):
    """Lightning's ``RichModelSummary``, with the FLOPs column and total left out when nothing was counted."""

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        totals = Table.grid(expand=True)
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):
            totals.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(totals)
