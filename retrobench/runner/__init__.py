"""The run layer: one Hydra config in, one finished run folder in the store out.

- :mod:`~retrobench.runner.run` — ``retrobench run``: validate, build model/method/task/engine,
  run every sample, write the run folder (resumable, named by the config hash).
- :mod:`~retrobench.runner.samples` — the samples of one run: one at a time, batched, or graded in the background.
- :mod:`~retrobench.runner.modes` — how one sample runs per task mode (generate, teacher-forced, fidelity).
- :mod:`~retrobench.runner.launch` — command-line overrides checked before Hydra composes, and the Hydra app.
- :mod:`~retrobench.runner.validation` — every config check before anything loads, with the bad
  key and its allowed values in the message.
- :mod:`~retrobench.runner.reference` — the cache of full-attention references (ppl / fidelity).
- :mod:`~retrobench.runner.gpus` — one whole free GPU per job under the multi-GPU launchers.

It imports the engine, methods, tasks, inputs and store; never a driver or the report (except the
optional wandb hook at the end of a run).
"""
