"""Downstream evaluation: task files, probes on frozen embeddings, and reports.

    result = musicssl.evaluate.evaluate("genre.csv", ["simclr-mini", "mfcc"], layers="all")
    table = musicssl.evaluate.format_table(result)   # Markdown, as `musicssl eval` prints it
"""

from musicssl.evaluate.metrics import PRIMARY, compute
from musicssl.evaluate.probes import PROBES, Fit, Problem, make_problem, run_probe
from musicssl.evaluate.report import format_table
from musicssl.evaluate.run import EvalResult, ModelResult, evaluate, write_outputs
from musicssl.evaluate.tasks import KINDS, Task, load_task

__all__ = ["KINDS", "PRIMARY", "PROBES", "EvalResult", "Fit", "ModelResult", "Problem", "Task", "compute",
           "evaluate", "format_table", "load_task", "make_problem", "run_probe", "write_outputs"]
