"""train-student's method flags, generated from the method registry.

One click option per option name in the registry (``--temperature`` serves kd, dkd and simkd),
its help listing each method's meaning and default; nothing here names a method. The options
are added when click asks the command for its parameters, so ``kdpipe --help`` does not import
the methods (and torch).
"""

from __future__ import annotations

from functools import cache

import click

__all__ = ["MethodOptionsCommand", "method_options_given", "PARAM_PREFIX", "option_flag", "option_help"]

#: click parameter names of the generated options: ``method_option__<name>``
PARAM_PREFIX = "method_option__"


def option_flag(name: str) -> str:
    """``feat_weight`` -> ``--feat-weight``."""
    return "--" + name.replace("_", "-")


def option_help(per_method: dict) -> str:
    """ "kd: temperature T (default 4); dkd: ..." for one option name."""
    return "; ".join(f"{m}: {i.help} (default {i.default_text()})" for m, i in per_method.items()) + "."


def _click_option(name: str, per_method: dict) -> click.Option:
    types = {i.type for i in per_method.values()}
    if len(types) != 1:
        raise TypeError(f"method option {name} has several types across methods: {types}")
    kind = types.pop()
    flag = option_flag(name)
    help_text = option_help(per_method)
    if kind is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", PARAM_PREFIX + name], default=None, help=help_text)
    choices = {c for i in per_method.values() for c in (i.choices or ())}
    click_type = click.Choice(sorted(choices)) if choices else kind
    return click.Option([flag, PARAM_PREFIX + name], type=click_type, default=None, help=help_text)


@cache
def _generated_options() -> tuple[click.Option, ...]:
    from kdpipe.methods.registry import option_infos

    return tuple(_click_option(name, per_method) for name, per_method in sorted(option_infos().items()))


class MethodOptionsCommand(click.Command):
    """A click command with the registry's method options after its own."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_options = [p for p in params if p.name == "help"]
        own = [p for p in params if p.name != "help"]
        return own + list(_generated_options()) + help_options


def method_options_given(opts: dict) -> dict:
    """{option name: value} of the generated options in a command's keyword arguments."""
    return {k[len(PARAM_PREFIX) :]: v for k, v in opts.items() if k.startswith(PARAM_PREFIX)}
