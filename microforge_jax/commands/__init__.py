"""The command lines: flags -> one library call, with the one-line error contract of `cli.run`.

Each module's `main(argv=None) -> int` is a console script (`microforge-train`, `microforge-sample`)
and what the root `train.py` / `sample.py` call. The library modules parse no flags.
"""
