"""MkDocs hook: the reference pages, generated from the code at every build (not copied by hand):
every command's ``--help``, and every config class with its keys, defaults and shipped YAML."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re

from mkdocs.structure.files import File

# config class -> the shipped YAML files it reads
CONFIGS = {"PipelineConfig": ("pipeline.yaml", "smoke.yaml"), "ChannelsConfig": ("channels.yaml",), "ChannelSpec": (),
           "WindowsConfig": ("windows.yaml",), "LayoutsConfig": ("layouts.yaml",), "ArrayLayout": (),
           "PretrainConfig": ("ssl_pretrain.yaml",), "CorpusConfig": ("corpus_realdata.yaml",), "CorpusSource": (),
           "ButppgConfig": ("butppg.yaml",), "FinetuneConfig": ("finetune_butppg.yaml",),
           "TuneSearchConfig": ("tune_finetune.yaml",)}


def commands_page() -> str:
    from biofm import cli

    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = ["# Commands\n", "Every command's `--help`, as `biofm` prints it. `python jobs/<command>.py` "
             "takes the same flags, for `ray job submit`.\n", "```text", parser.format_help().rstrip(), "```\n"]
    for name, sub in commands.items():
        parts += [f"## biofm {name}\n", "```text", sub.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


def field_docs(cls) -> dict[str, str]:
    """Each field's meaning: the ``#:`` comment lines just above it in the class's source."""
    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"\s+#: ?(.*)", line)
        field = re.match(r"    (\w+): ", line)
        if comment:
            pending.append(comment.group(1))
        elif field and pending:
            docs[field.group(1)] = " ".join(pending)
        if not comment:
            pending = []
    return docs


def configs_page() -> str:
    from biofm import config

    parts = ["# Configs\n", "Each YAML file is read into one config class; an unknown key, a wrong type or a "
             "value out of range stops the command with the key's name. Flags and the pipeline's "
             "sections override keys. The keys, their types and defaults (those of a key the file leaves "
             "out) and meanings come from the code; the files are shown as shipped, with their comments.\n"]
    for name, files in CONFIGS.items():
        cls = getattr(config, name)
        docs = field_docs(cls)
        parts += [f"## {name}\n", inspect.getdoc(cls) or "", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            kind = str(f.type).replace("|", "\\|")  # "str | None", outside code, where the escape works
            meaning = docs.get(f.name, "").replace("|", "\\|")
            parts.append(f"| `{f.name}` | {kind} | `{default!r}` | {meaning} |")
        for file in files:
            parts += ["", f"`configs/{file}`:", "", "```yaml", config.resolve(f"configs/{file}").read_text().rstrip(), "```"]
        parts.append("")
    return "\n".join(parts)


def on_files(files, config):
    files.append(File.generated(config, "reference/commands.md", content=commands_page()))
    files.append(File.generated(config, "reference/configs.md", content=configs_page()))
    return files
