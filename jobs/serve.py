"""Deploy the GPT-2 Serve application (OpenAI-compatible API + comparison page) onto a Ray cluster, then return.

    python jobs/serve.py                                  # serving/config.yaml onto the running cluster
    python jobs/serve.py --variant mine=runs/pretrain/x/final --variant base=models:/gpt2-local-pretrained@champion
    python jobs/serve.py --blocking                       # stay in the foreground; Ctrl-C removes the application
    GPT2_API_KEY=... python jobs/serve.py                 # the API then needs `Authorization: Bearer <key>`

With no running cluster a local Ray instance is started for this process, which then stays in the foreground
(the application lives as long as that instance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

from cluster.runtime.ray_env import PROJECT_ROOT, init_ray


def load_serve_config(path: Path) -> tuple[dict, dict]:
    """(the application entry, http_options) from a Serve config file such as serving/config.yaml."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: cannot read serve config {path}: {e}")
    apps = (doc or {}).get("applications") or []
    if len(apps) != 1 or "args" not in apps[0]:
        raise SystemExit(f"error: {path}: expected one application with 'args' (see serving/config.yaml)")
    return apps[0], dict(doc.get("http_options") or {})


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"--variant takes NAME=SOURCE, got {text!r}")
    return name, source


def anchored(variant: str | dict, root: Path) -> str | dict:
    """A variant whose relative source path is made absolute against `root`."""
    spec = {"source": variant} if isinstance(variant, str) else dict(variant)
    source = spec.get("source", "")
    if isinstance(source, str) and "://" not in source and (root / source).exists():
        spec["source"] = str((root / source).resolve())
    return spec


def missing_here(variants: dict) -> dict[str, str]:
    """The variants whose source is a path that does not exist on this machine, with that path. Variants load on
    their first request, so the application starts without them (a checkpoint may still be training): until the
    path exists where the model replica runs, their requests answer 503 naming it. Hub names and MLflow URIs are not
    looked up here."""
    from serving.variants import parse_variants

    missing = {}
    for name, spec in parse_variants(variants).items():
        source = spec.resolved_source()
        if Path(source).is_absolute() and not Path(source).exists():
            missing[name] = source
    return missing


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "serving" / "config.yaml", help="Serve config file")
    p.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME=SOURCE",
                   help="add or replace a variant (checkpoint dir, HF dir or MLflow model URI); repeatable")
    p.add_argument("--only", action="store_true", help="serve only the --variant models, not the config's")
    p.add_argument("--root", type=Path, default=PROJECT_ROOT,
                   help="what the config's relative variant paths are relative to, and --variant paths that are not"
                        " found from the current directory (default: the project; a job submitted with `ray job"
                        " submit` runs in an uploaded copy, so pass the checkout's absolute path)")
    p.add_argument("--host", help="HTTP host (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a local head, else a new local instance)")
    p.add_argument("--blocking", action="store_true", help="stay in the foreground until Ctrl-C")
    args = p.parse_args(argv)

    app_entry, http = load_serve_config(args.config)
    settings = dict(app_entry["args"])
    variants = {} if args.only else {name: anchored(v, args.root) for name, v in (settings.get("variants") or {}).items()}
    # A path typed on the command line means what it means in the user's shell: relative to the current directory
    # (the replicas run elsewhere), else to --root like the config's.
    variants.update({name: anchored(anchored(v, Path.cwd()), args.root) for name, v in args.variant})
    settings["variants"] = variants
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)

    from ray import serve as ray_serve

    from serving.auth import API_KEY_ENV
    from serving.deploy import check_port, deploy
    from serving.settings import check_settings

    try:  # before Ray starts: a mistake in the config costs no cluster
        check_settings(settings)
        check_port(http["port"], "--port" if args.port is not None else f"http_options.port of {args.config}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    how = init_ray(args.address)
    name = app_entry.get("name", "gpt2")
    try:
        base = deploy(settings, host=http["host"], port=http["port"], name=name,
                      route_prefix=app_entry.get("route_prefix", "/"))
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    keyed = bool(settings.get("api_key") or os.environ.get(API_KEY_ENV))
    print(f"application {name!r} is up with variants {sorted(variants)}")
    for variant, path in missing_here(variants).items():
        print(f"  not found:  {variant!r}: {path} does not exist on this machine; requests for {variant!r} answer 503 "
              "until it does")
    print(f"  web page:   {base}/")
    print(f"  API:        {base}/v1  (OpenAI-compatible: /v1/completions, /v1/models)")
    print(f"  also:       {base}/tokenize, /detokenize, /tokenizer_info (as vLLM's), /metrics (Prometheus)")
    if keyed:
        print("  API key:    required (Authorization: Bearer <key>) on every route but the page and /healthz")
    auth = " -H \"Authorization: Bearer $GPT2_API_KEY\"" if keyed else ""
    print(f"  example:    curl {base}/v1/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{sorted(variants)[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 20}}'")
    if how == "local" and not args.blocking:
        print("no running Ray cluster was found, so the application lives in this process: staying in the foreground")
    if args.blocking or how == "local":
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray_serve.delete(name)
            print(f"application {name!r} removed")


if __name__ == "__main__":
    sys.exit(main())
