"""Built-in tasks with verifiable rewards (arithmetic first) and the quickstart pipeline.

Submodules are imported on use (`preftune.tasks.arithmetic`, `.sft`, `.quickstart`) so that
`preftune --help`, which imports `preftune.tasks.commands`, does not load torch or transformers.
"""
