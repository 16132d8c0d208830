"""Tasks: one module per task with its ``conf/task/<name>.yaml``; helpers live in :mod:`.lib`.

Besides the tasks, only ``base`` (the task contract) and ``graders`` (answer extraction and math
equivalence, shared by every task) sit here. ``lib/`` holds the helpers of particular tasks:
``longgenbench_data`` (LongGenBench's offline generators), ``livecodebench`` (LiveCodeBench
problems, prompt and extraction) and ``sandbox`` (running candidate programs).
``tests/test_layout.py`` checks that every other module here is a task some config targets.
"""

HELPERS = ("base", "graders")
