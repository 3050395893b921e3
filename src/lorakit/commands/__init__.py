"""One module per `lorakit` subcommand: `HELP`, `add_arguments(parser)`, `run(args) -> int`.

Modules import torch/transformers inside `run` only, so that listing commands stays fast.
The table of commands is `lorakit.cli.COMMANDS`.
"""
