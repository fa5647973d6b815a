"""`optimum-cli export foldgpt ...`: optimum's CLI finds this module in the
`optimum.commands.register` namespace (pyproject.toml maps it here) and adds the command."""

from export.optimum_cli import REGISTER_COMMANDS  # noqa: F401
