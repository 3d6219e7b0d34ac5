"""Tasks adapt a model to the loop; `config.task` names one (see base.py for the protocol).

    lm              next-token LM on text (tokens)                     lm.py
    recall          next-token LM on synthetic recall data; exact match lm.py
    mlm             masked LM, BERT's 80/10/10 corruption (tokens)      mlm.py
    classification  images -> labels (examples)                         classification.py
    contrastive     image-text pairs, CLIP / SigLIP losses (examples)   contrastive.py
    captioning      image -> caption, next-token (tokens)               captioning.py
"""

from __future__ import annotations

from zoo.training.tasks.base import Task, forward_with_aux, objective_sum
from zoo.training.tasks.captioning import CaptioningTask
from zoo.training.tasks.classification import ClassificationTask
from zoo.training.tasks.contrastive import ContrastiveTask
from zoo.training.tasks.lm import LMTask, finalize, lm_sums
from zoo.training.tasks.mlm import MLMTask

TASKS = {"lm": LMTask, "recall": LMTask, "mlm": MLMTask, "classification": ClassificationTask,
         "contrastive": ContrastiveTask, "captioning": CaptioningTask}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r} (config.task); choose one of {sorted(TASKS)}")
  return TASKS[name]()


__all__ = ["CaptioningTask", "ClassificationTask", "ContrastiveTask", "LMTask", "TASKS", "Task", "finalize", "forward_with_aux",
           "MLMTask", "get_task", "lm_sums", "objective_sum"]
