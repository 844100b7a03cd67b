"""``python -m runtime SUBCOMMAND ...`` — a thin dispatcher.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; add new ones to ``SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("runtime.eval_cli", "perplexity, bits per byte and KL divergence to the original, of a checkpoint "
             "or a GGUF (in llama.cpp), on a corpus split"),
    "corpus": ("runtime.corpus_cli", "build or inspect the text corpora"),
    "tiny": ("runtime.tiny_models", "write a tiny random MoE checkpoint"),
    "apply": ("runtime.apply_cli", "apply a plan to a checkpoint: prune, re-route, quantize, write"),
    "export": ("runtime.export_cli", "write a quantized GGUF, or deployment recipes (llama.cpp, GPTQModel, torchao), "
               "for a plan"),
    "llama-cpp": ("runtime.llamacpp", "build llama.cpp's tools from the llama-cpp-python sdist; show which are used"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
