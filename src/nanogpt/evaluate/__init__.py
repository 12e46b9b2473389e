"""Evaluation: exact loss / perplexity over every token, HellaSwag accuracy, samples, a report.

    from nanogpt.evaluate import split_loss, run_tasks
    split_loss(model, open_split("data/shakespeare_char", "val"))   # {"loss", "ppl", "tokens", ...}
    run_tasks(model, tok, ["hellaswag", "wikitext"])                # {"eval/hellaswag_acc_norm": ...}

Modules: loss (sliding windows), hellaswag, tasks (tasks by name, one model), report (JSON, markdown).
"""

from nanogpt.evaluate.hellaswag import hellaswag_eval, load_hellaswag
from nanogpt.evaluate.loss import plan_windows, split_loss, text_tokens
from nanogpt.evaluate.report import default_out, markdown_table, write_report
from nanogpt.evaluate.tasks import TASKS, TaskOptions, TaskResult, evaluate_source, run_task, run_tasks

__all__ = [
    "TASKS",
    "TaskOptions",
    "TaskResult",
    "default_out",
    "evaluate_source",
    "hellaswag_eval",
    "load_hellaswag",
    "markdown_table",
    "plan_windows",
    "run_task",
    "run_tasks",
    "split_loss",
    "text_tokens",
    "write_report",
]
