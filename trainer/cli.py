"""What every command line of the package shares: one-paragraph errors, flag parsing, flags made from the config.

Each config field's help is written once, in its metadata (trainer/config.py);
`define_config_flags` makes the absl flags from the fields, so the trainer and
the benchmark define the same flags with the same help.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping, NoReturn

from absl import flags

from trainer import config as config_lib

EXIT_USAGE = 2  # absl's code for a usage error: fix the named flag or file
# A field's type annotation -> the absl flag definer (Optional types take None too).
_DEFINERS = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer,
             "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}


def fail(message: str, exit_code: int = EXIT_USAGE) -> NoReturn:
    """Prints a one-paragraph error (no traceback) and exits with `exit_code`."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(exit_code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for app.run, with a one-paragraph error instead of the usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}. Run with --helpshort for the flags.")


def flag_help(field: str, extra: str = "") -> str:
    """A config field's help text, its choices listed, then `extra`."""
    text = config_lib.leaf_fields()[field].metadata["help"]
    if config_lib.choices(field):
        text += " One of " + ", ".join(config_lib.choices(field)) + "."
    return f"{text} {extra}".rstrip()


def define_config_flags(fields: Iterable[str] | None = None,
                        defaults: Mapping[str, Any] | None = None,
                        extra_help: Mapping[str, str] | None = None,
                        module_name: str | None = None) -> tuple[str, ...]:
    """Defines one absl flag per config field, named and documented by its metadata.

    Args:
      fields: the config fields to define (default: all).
      defaults: the flag default of a field when it is not the config's own
        (only what --help shows and what a command reads when the flag is absent).
      extra_help: text appended to a field's help (e.g. a list known at run time).
      module_name: the command's module (`__name__`), so that --helpshort lists the flags.

    Returns:
      The flag names defined.
    """
    all_fields = config_lib.leaf_fields()
    if module_name == "__main__":  # as absl names the module run by `python -m`
        module_name = sys.argv[0]
    defaults, extra_help = defaults or {}, extra_help or {}
    names = []
    for field in fields or all_fields:
        spec = all_fields[field]
        kind = spec.type.replace(" | None", "")
        name = config_lib.flag_name(field)
        _DEFINERS[kind](name, defaults.get(field, spec.default),
                        flag_help(field, extra_help.get(field, "")), module_name=module_name)
        names.append(name)
    return tuple(names)


def given_values(flag_values: flags.FlagValues, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags among `names` given on the command line (by flag name)."""
    return {name: flag_values[name].value for name in names
            if name in flag_values and flag_values[name].present}


def config_flag_sections() -> dict[str, tuple[str, ...]]:
    """The config's flags by section, as the flags page lists them: heading -> flag names."""
    fields = config_lib.leaf_fields()
    top = tuple(name for name in fields if name in config_lib.Config.__dataclass_fields__)
    sections = {"The run": top}
    for heading, section in (("Data", config_lib.DataConfig), ("Model", config_lib.ModelConfig),
                             ("Training", config_lib.TrainConfig)):
        sections[heading] = tuple(config_lib.flag_name(name) for name in section.__dataclass_fields__)
    return sections


def flags_markdown(flag_values: flags.FlagValues, sections: Mapping[str, Iterable[str]]) -> str:
    """The flags page: one table per section of flag names, each flag with its default and help.

    Args:
      flag_values: the command's parsed or unparsed flags (their definitions are read).
      sections: heading -> the flag names listed under it, in order.
    """
    lines = []
    for heading, names in sections.items():
        lines += [f"## {heading}", "", "| flag | default | what it does |", "|---|---|---|"]
        for name in names:
            flag = flag_values[name]
            spelling = f"`--{name}` / `--no{name}`" if flag.boolean else f"`--{name}`"
            default = "" if flag.default is None else f"`{flag.default_as_str.strip(chr(39))}`"
            text = " ".join(flag.help.split()).replace("|", "\\|").replace("<", "&lt;")
            lines.append(f"| {spelling} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)
