#!/usr/bin/env python3
"""Writes docs/flags.md, every flag of `python -m trainer.main`, from the flag definitions.

  python scripts/write_flags_page.py          # rewrites docs/flags.md
  python scripts/write_flags_page.py --check  # exit 1 if docs/flags.md is out of date

The help of each flag is written once, in trainer/config.py; tests/test_docs.py
checks that this page matches it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainer import cli, main  # noqa: E402  (after the path)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "flags.md")
HEADER = """# Flags of `python -m trainer.main`

Generated from the flag definitions by `python scripts/write_flags_page.py` (each
flag's help is written once, in `trainer/config.py`); `tests/test_docs.py` fails
when this page is out of date. `--experiment=NAME` fills many of them at once
(`trainer/experiments.py`); a flag given explicitly overrides the preset. A bad
value is a one-paragraph error naming the flag, with exit code 2.

"""
FOOTER = """## Defined by libraries

| flag | what it does |
|---|---|
| `--tfhub_cache_dir` | tensorflow_hub's own flag: where TF Hub models are downloaded (as `TFHUB_CACHE_DIR`) |
| `--tfhub_model_load_format` | tensorflow_hub's own flag: `AUTO`, `COMPRESSED` or `UNCOMPRESSED` downloads |
| `--helpshort`, `--helpfull` | absl: the flags of the trainer, or of every library too |
"""


def page() -> str:
    """The flags page as it should read."""
    sections = cli.config_flag_sections()
    sections["The run"] += ("print_config",)
    return HEADER + cli.flags_markdown(main.FLAGS, sections) + FOOTER


if __name__ == "__main__":
    text = page()
    if sys.argv[1:] == ["--check"]:
        with open(PAGE) as f:
            sys.exit(0 if f.read() == text else 1)
    with open(PAGE, "w") as f:
        f.write(text)
