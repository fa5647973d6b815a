"""`optimum-cli export foldgpt BACKEND MODEL_DIR --out OUT`: the Hugging Face convention for
exporters. optimum's CLI registers commands from the `optimum.commands.register` namespace;
pyproject.toml maps export/optimum_register/ there, and this command is `foldgpt export` under
another name (the same arguments, the same function, the same one-line errors)."""

from __future__ import annotations

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class FoldGPTExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="foldgpt", help="a folded (or dense) model to ONNX or ExecuTorch, each shared weight once")

    @staticmethod
    def parse_args(parser) -> None:
        from foldgpt.cli import add_export_args

        add_export_args(parser)

    def run(self) -> None:
        from foldgpt.cli import cmd_export, run_command

        code = run_command(cmd_export, self.args, "optimum-cli export foldgpt")
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [(FoldGPTExportCommand, ExportCommand)]
