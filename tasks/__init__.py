"""Tasks: one module per task with its ``conf/task/<name>.yaml``, plus the helper modules below.

Helpers (no config of their own; used by the tasks): ``base`` (the task contract), ``graders``
(answer extraction and math equivalence), ``longgenbench_data`` (LongGenBench's offline
generators), ``livecodebench`` (LiveCodeBench problems, prompt and extraction for
``task=reasoning task.benchmark=livecodebench``) and ``sandbox`` (running candidate programs).
``tests/test_layout.py`` checks that every other module here is a task some config targets.
"""

HELPERS = ("base", "graders", "longgenbench_data", "livecodebench", "sandbox")
