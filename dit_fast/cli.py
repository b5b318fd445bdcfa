"""The `dit-fast` command: `dit-fast <command> [args]`.

    dit-fast demo --out DIR          train a small DiT on the bundled digits and sample it (CPU, minutes)
    dit-fast train ...               train a DiT (same as `python -m dit_fast.train`)
    dit-fast extract-latents ...     pre-extract VAE latents (same as `python -m dit_fast.extract_latents`)
    dit-fast sample ...              sample a checkpoint (dit_fast.sample)
    dit-fast sample-ddp ...          sample for FID (dit_fast.sample_ddp)
    dit-fast selftest [--device D]   check every kernel against its reference here (dit_fast.selftest)

Each command module exposes `main(argv[, prog]) -> exit status`; a command whose module is absent
is not offered.
"""
import importlib
import importlib.util
import inspect
import sys
from typing import Dict, Optional, Sequence, Tuple

# name -> (module, one-line help); commands whose module is absent are not offered.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "demo": ("dit_fast.demo", "train a small class-conditional DiT on the bundled 8x8 digits, then sample it"),
    "train": ("dit_fast.train", "train a DiT (DDP via torchrun, EMA, bf16, latents, exact resume)"),
    "extract-latents": ("dit_fast.extract_latents", "encode an ImageFolder (and its flips) into latent shards"),
    "sample": ("dit_fast.sample", "sample images from a checkpoint"),
    "sample-ddp": ("dit_fast.sample_ddp", "sample many images for FID (torchrun, .npz dump)"),
    "selftest": ("dit_fast.selftest", "check every kernel, then a small DiT, against the references on this device"),
}


def available() -> Dict[str, Tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out[name] = (module, help_)
    return out


def usage() -> str:
    cmds = available()
    width = max(len(n) for n in cmds)
    lines = ["usage: dit-fast <command> [options]   (dit-fast <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in cmds.items()]
    lines += ["", "New here? Try:  dit-fast demo --out dit-fast-demo   (a few minutes on 2 CPU cores)"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"dit-fast {__version__}")
        return 0
    cmds = available()
    name = argv[0]
    if name not in cmds:
        print(f"dit-fast: error: unknown command {name!r}; choose from {', '.join(cmds)} (see dit-fast --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(cmds[name][0])
    try:
        takes_prog = "prog" in inspect.signature(module.main).parameters
    except (TypeError, ValueError):
        takes_prog = False
    if takes_prog:
        return int(module.main(argv[1:], prog=f"dit-fast {name}") or 0)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
