"""Task registry: names accepted by `omnimini eval --tasks`."""

from __future__ import annotations

from omnimini.eval.errors import EvalError
from omnimini.eval.tasks.base import EvalItem, Task, TaskOptions
from omnimini.eval.tasks.embodied import SCENE_TASKS, SceneTask
from omnimini.eval.tasks.gpqa import GPQA
from omnimini.eval.tasks.hle import HLE
from omnimini.eval.tasks.mmlu import MMLU
from omnimini.eval.tasks.mmlu_pro import MMLUPro

ALIASES = {
    "gpqa": ["gpqa_diamond"],  # the split behind GPT-4o mini's published 40.2
    "text": ["mmlu", "mmlu_pro", "gpqa_diamond", "hle"],
    "embodied": ["scene_qa", "pointing", "planning", "navigation"],
    "vision": list(SCENE_TASKS),  # the embodied tasks + plain-background shapes
}


def make_task(name: str) -> Task:
    if name == "mmlu":
        return MMLU()
    if name == "mmlu_pro":
        return MMLUPro()
    if name in ("gpqa_main", "gpqa_diamond"):
        return GPQA(name.split("_", 1)[1])
    if name == "hle":
        return HLE()
    if name in SCENE_TASKS:
        return SceneTask(name, SCENE_TASKS[name])
    known = ["mmlu", "mmlu_pro", "gpqa_main", "gpqa_diamond", "hle", *SCENE_TASKS, *ALIASES]
    raise EvalError(f"unknown task {name!r}; known tasks: {', '.join(known)}")


def get_tasks(names: list[str] | str) -> list[Task]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    expanded: list[str] = []
    for n in names:
        for m in ALIASES.get(n, [n]):
            if m not in expanded:
                expanded.append(m)
    if not expanded:
        raise EvalError("no tasks given; e.g. --tasks mmlu,gpqa_diamond,scene_qa")
    return [make_task(n) for n in expanded]


__all__ = ["ALIASES", "EvalItem", "Task", "TaskOptions", "get_tasks", "make_task"]
