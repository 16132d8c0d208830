"""Helpers of the tasks, not tasks themselves (no ``conf/task`` config of their own).

``longgenbench_data`` (LongGenBench's offline question generators and hub rows, for
:mod:`retrobench.tasks.longgenbench`), ``livecodebench`` (LiveCodeBench problems, prompt and
extraction for ``task=reasoning task.benchmark=livecodebench``) and ``sandbox`` (running candidate
programs against test cases, each in its own contained subprocess).
"""
