from kdpipe.cli import cli

COMMANDS = ["train-teacher", "extract-teacher", "cluster", "train-student", "evaluate", "inspect", "demo"]


def test_help_lists_every_command(cli_runner):
    result = cli_runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
