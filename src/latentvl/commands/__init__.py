"""The ``latentvl`` subcommands, one module each: flags (``add_arguments``) and ``run(args) -> int``."""
