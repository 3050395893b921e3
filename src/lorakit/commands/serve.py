"""`lorakit serve`: an OpenAI-compatible HTTP server for a base model and many LoRA adapters."""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection

from lorakit.commands.generate import add_gguf_base_argument
from lorakit.lora.names import adapter_name_for

HELP = "serve a model and its adapters over an OpenAI-compatible HTTP API"

API_KEY_ENV = "LORAKIT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model: built-in name, model dir, .gguf file or hub id (default: smollm2-135m)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the adapter in PATH as model NAME; repeat for several (NAME defaults to "
                             "the directory name). More can be loaded at run time: POST /v1/adapters")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the name clients use for the base model (default: the --model value)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, else none)")
    parser.add_argument("--max-adapters", type=_positive_int, default=None, metavar="N",
                        help="adapters kept in memory; past that the least recently used is unloaded and "
                             "reloaded from disk when asked for again (default: no limit)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=32, metavar="N",
                        help="requests decoded together; more wait their turn (default: 32)")
    parser.add_argument("--max-prefill-tokens", type=_positive_int, default=4096, metavar="N",
                        help="prompt tokens prefilled in one forward pass (default: 4096)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (default: bfloat16 on a CUDA GPU, float32 otherwise)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    add_gguf_base_argument(parser)
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for the model (default: PyTorch's choice); on a busy machine "
                             "fewer threads can be faster")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level (default: info)")


def run(args: argparse.Namespace) -> int:
    import sys

    from lorakit.models import load_model
    from lorakit.models.load import packed_choice
    from lorakit.serve import AdapterRegistry, Engine, create_app
    from lorakit.serve.server import serving

    name = args.model_name or args.model
    adapters: list[tuple[str, str]] = []
    for spec in args.adapter:
        adapters.append(parse_adapter_spec(spec, taken=[name, *(n for n, _ in adapters)]))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_port_free(args.host, args.port)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, packed=packed_choice(args.gguf_base))
    registry = AdapterRegistry(model, name, max_adapters=args.max_adapters)
    for adapter_name, path in adapters:
        registry.add(adapter_name, path)
    engine = Engine(model, tokenizer, registry, max_batch_size=args.max_batch_size,
                    max_prefill_tokens=args.max_prefill_tokens)
    app = create_app(engine, name, api_key=api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"lorakit: warning: listening on {args.host} without --api-key: anyone who can reach this port "
              "can use the server", file=sys.stderr)
    names = ", ".join([name, *registry.names()])
    with serving(app, args.host, args.port, log_level=args.log_level):
        print(f"serving {names} at http://{args.host}:{args.port}/v1", file=sys.stderr)
        try:
            engine.run()  # the model runs in the main thread, HTTP in a side thread (see Engine.run)
        except KeyboardInterrupt:
            pass
    return 0


def parse_adapter_spec(spec: str, taken: Collection[str] = ()) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its directory, apart from `taken`."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = adapter_name_for(spec, taken)
    if not name or not path:
        raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--adapter {spec!r}: adapter directory not found: {path}")
    return name, path


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line before loading the model if the port is taken."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
