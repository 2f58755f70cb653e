"""The ``--help`` layout shared by the command lines (``cmi-glue``, ``python -m bench``, ``bench.tune``, ...)."""

import argparse
import copy


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, also for options without a help text, except where there is nothing to say:
    required options, flags (default False) and options without a default (None)."""

    @staticmethod
    def _default_to_show(action: argparse.Action) -> bool:
        # identity, not ``in``: a default of 0 equals False
        unset = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        return bool(action.option_strings) and not action.required and not unset

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._default_to_show(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._default_to_show(action) else action.help
