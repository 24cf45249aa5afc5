"""`mistralrs --help` in sections, and `--version`.

The global options are declared in one long callback (cli.py) that several people extend; rather
than a rich_help_panel on every declaration, PANELS assigns each option to its section by its
Python name here, once. An option not in the table keeps its own rich_help_panel, else it is
listed under "Other options". Plain click formatting (no rich boxes): the help stays greppable.
"""
from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

OUTPUT = "Output modes (one of them; none: the server on port 1234)"
SERVER = "Server"
ENGINE = "Engine (batching, KV cache, speculation)"
MODEL = "Model loading"
LOGGING = "Logging"
OTHER = "Other options"

PANELS: dict[str, str] = {
    **dict.fromkeys(("prompt", "interactive", "port", "raw"), OUTPUT),
    **dict.fromkeys(("host", "api_key", "request_logging_file"), SERVER),
    **dict.fromkeys(("max_seqs", "no_kv_cache", "no_paged_attn", "pa_blk_size", "pa_gpu_mem", "pa_gpu_mem_usage",
                     "pa_ctxt_len", "prefix_cache_n", "truncate_sequence", "spec_ngram"), ENGINE),
    **dict.fromkeys(("chat_template", "token_source", "device", "num_device_layers", "dtype", "numerics", "isq"),
                    MODEL),
    **dict.fromkeys(("log", "verbose", "quiet"), LOGGING),
}


def panel_of(param: Any) -> str:
    return PANELS.get(param.name or "") or getattr(param, "rich_help_panel", None) or OTHER


ORDER = (OUTPUT, SERVER, ENGINE, MODEL, "Sampling", "Limits", LOGGING)


def _rank(section: str, first_seen: list[str]) -> tuple[int, int]:
    """Sections in ORDER (matched by their first word, so a panel's long title may change), then
    panels declared elsewhere in the order the callback declares them, then OTHER last."""
    known = [i for i, name in enumerate(ORDER) if section.split()[0] == name.split()[0]]
    return (known[0] if known else len(ORDER) + (section == OTHER), first_seen.index(section))


class GroupedHelp(TyperGroup):
    """A Typer group whose --help lists the global options in sections (PANELS)."""

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name == "option":
                sections.setdefault(panel_of(param), []).append(record)
        for name in sorted(sections, key=lambda s: _rank(s, list(sections))):
            with formatter.section(name):
                formatter.write_dl(sections[name])
        self.format_commands(ctx, formatter)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mistralrs-cli")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def print_version(ctx: typer.Context, value: bool) -> None:
    """--version: '<program> <version>' as clap prints it for mistralrs-server, then exit."""
    if value:
        prog = ctx.find_root().info_name or "mistralrs"
        print(f"{prog} {package_version()}")
        raise typer.Exit()
